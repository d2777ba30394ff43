"""``examples/fastapi_app.py`` as it is (``python examples/fastapi_app.py --server S --port 0``), under
each ASGI server: one token check for the REST route and the WebSocket upgrade, ``POST /notes``
publishing to Tank's subscribers, Tank's API below ``/tank``, and the signals that stop it."""

from __future__ import annotations

import asyncio
import signal

import pytest
import websockets
from asgi_support import AsgiProcess
from e2e_support import connect_hello, expect_next, hello, recv_data, run, ws_connect

import tank_asyncio


async def quiet(app: AsgiProcess) -> None:
    await app.await_stats(lambda s: s["connections"] == 0, timeout=5, what="no connections")


async def refused_status(url: str, **kw: object) -> int:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await ws_connect(url, **kw)
    return int(refused.value.response.status_code)


def test_websocket_upgrade_uses_the_application_token_check(example_app: AsgiProcess) -> None:
    url = example_app.ws_url

    async def main() -> None:
        # ?token= (what a browser can send) and Authorization: Bearer (what others can).
        async with ws_connect(f"{url}?user_id=alice&token=t-alice") as ws:
            assert await ws.recv() == hello("alice")
        async with ws_connect(f"{url}?user_id=bob",
                              additional_headers={"Authorization": "Bearer t-bob"}) as ws:
            assert await ws.recv() == hello("bob")
        # Refused through the denial response: 401, never upgraded.
        assert await refused_status(f"{url}?user_id=alice") == 401  # no token
        assert await refused_status(f"{url}?user_id=alice&token=nope") == 401  # unknown token
        assert await refused_status(f"{url}?user_id=bob&token=t-alice") == 401  # someone else's
        assert await refused_status(f"{url}?token=t-alice") == 401  # an invented id is not alice
        assert await refused_status(f"{url}?user_id=bob",
                                    additional_headers={"Authorization": "Bearer t-alice"}) == 401
        # Our Python client passes the token as the query parameter.
        async with tank_asyncio.connect(url, user_id="alice", token="t-alice", reconnect=False) as c:
            assert c.connected and c.user_id == "alice"
        with pytest.raises(ConnectionError, match="401"):
            async with tank_asyncio.connect(url, user_id="alice", token="t-bob", reconnect=False):
                pass
        await quiet(example_app)  # nothing refused was left open

    run(main())


def test_post_notes_publishes_to_the_subscribers(example_app: AsgiProcess) -> None:
    async def post(token: str | None, body: object) -> tuple[int, object]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        answer = await asyncio.to_thread(
            example_app.app_http, "POST", "/notes", body, headers)  # type: ignore[arg-type]
        return answer.status, answer.json()

    async def main() -> None:
        await quiet(example_app)
        alice_ws = await connect_hello(f"{example_app.ws_url}?user_id=alice&token=t-alice", "alice")
        await alice_ws.send("sub:notes")
        async with tank_asyncio.connect(example_app.ws_url, user_id="bob", token="t-bob",
                                        reconnect=False) as bob:
            stream = bob.messages("notes")
            await example_app.await_stats(lambda s: s["topics"] == {"notes": 2}, what="2 subs")

            assert await post("t-bob", {"text": "hello ✓"}) == (200, {"delivered": 2})
            await expect_next(alice_ws, '{"topic":"notes","data":"bob: hello ✓"}')
            message = await asyncio.wait_for(anext(stream), 3)
            assert (message.topic, message.data) == ("notes", "bob: hello ✓")

            # The REST route refuses a bad or missing token with 401, and publishes nothing.
            assert await post("t-nobody", {"text": "spoof"}) == (401, {"detail": "unknown token"})
            assert await post(None, {"text": "spoof"}) == (401, {"detail": "unknown token"})
            assert (await post("t-alice", {"wrong": "body"}))[0] == 422
            assert await post("t-alice", {"text": "second"}) == (200, {"delivered": 2})
            assert await recv_data(alice_ws) == '{"topic":"notes","data":"alice: second"}'
            message = await asyncio.wait_for(anext(stream), 3)
            assert message.data == "alice: second"  # the refused ones never arrived
        await alice_ws.close()
        await quiet(example_app)
        assert await post("t-alice", {"text": "nobody"}) == (200, {"delivered": 0})

    run(main())


def test_tank_api_answers_below_the_mount_point(example_app: AsgiProcess) -> None:
    assert example_app.http("GET", "/healthz").status == 200
    stats = example_app.http("GET", "/api/stats")
    assert stats.status == 200 and stats.json()["shutting_down"] is False
    assert example_app.publish("nobody-listens", "x") == 0  # POST /tank/api/publish
    assert example_app.http("GET", "/tank.js").status == 200
    assert example_app.app_http("GET", "/api/stats").status == 404  # only below /tank


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_it_with_exit_status_0(example_stop_app: AsgiProcess, signum: int) -> None:
    app = example_stop_app
    assert app.http("GET", "/readyz").status == 200
    app.send_signal(signum)
    assert app.wait(10) == 0
    assert app.extra_stdout == b"", app.extra_stdout  # one line of stdout: the URL
