"""The contract, part 2: ``authenticate`` and ``authorize_subscribe``, plain functions or coroutine
functions (an exception refuses, and is logged), and the configuration they need."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from contract_support import HELLO, RawPeer, Serve, eventually, masked_frame, recv_text, ws_client
from websockets.exceptions import InvalidStatus

from tank_core import ConfigError, ServerConfig
from tank_core.actions import AuthorizeSubscription, UpgradeRequest
from tank_core.notifications import ErrorOccurred

STYLES = ["sync", "async", "async-callable-object"]


def attempt(url: str) -> int | str:
    """The Hello text, or the HTTP status of the refusal."""
    try:
        with ws_client(url) as ws:
            return recv_text(ws)
    except InvalidStatus as exc:
        return int(exc.response.status_code)


def styled(style: str, decide: Any, nap: Any) -> Any:
    """``decide`` as a plain function, a coroutine function, or an object with an async __call__."""
    if style == "sync":
        return decide

    async def later(*args: Any) -> Any:
        await nap()
        return decide(*args)

    if style == "async":
        return later

    class Checker:
        async def __call__(self, *args: Any) -> Any:
            return await later(*args)

    return Checker()


@pytest.mark.parametrize("style", STYLES)
def test_authenticate_accepts_and_refuses_with_401(serve: Serve, style: str) -> None:
    requests: list[UpgradeRequest] = []
    errors: list[ErrorOccurred] = []

    def check(request: UpgradeRequest) -> bool:
        requests.append(request)
        return request.query_value("token") == "ok"

    srv = serve(authenticate=styled(style, check, lambda: srv.nap(0.01)), on_error=errors.append)
    assert attempt(srv.url + "?user_id=u1&token=ok") == HELLO.format("u1")
    with pytest.raises(InvalidStatus) as refused:
        ws_client(srv.url + "?user_id=u2&token=bad")
    assert refused.value.response.status_code == 401
    assert refused.value.response.body == b"Unauthorized"
    assert [e.code for e in errors] == [1007]  # the reference's "authentication failed"
    assert srv.stats().connections_total == 1
    first = requests[0]
    assert [r.query_value("token") for r in requests] == ["ok", "bad"]
    assert (first.path, first.user_id, first.peer_host) == ("/ws", "u1", "127.0.0.1")
    assert first.header("Upgrade") == "websocket"


@pytest.mark.parametrize("style", ["sync", "async"])
def test_authenticate_answers_statuses_and_exceptions(
    serve: Serve, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    answers: dict[str, object] = {"ok": True, "banned": 403, "down": 503, "yes": "yes", "200": 200,
                                  "false": False, "none": None}

    def decide(request: UpgradeRequest) -> object:
        token = request.query_value("token") or ""
        if token == "boom":
            raise RuntimeError("database down")
        return answers[token]

    srv = serve(authenticate=styled(style, decide, lambda: srv.nap(0)))
    with caplog.at_level(logging.ERROR, logger="tank"):
        got = {token: attempt(srv.url + f"?user_id=q&token={token}") for token in [*answers, "boom"]}
    assert got == {"ok": HELLO.format("q"), "banned": 403, "down": 503, "yes": 401, "200": 401,
                   "false": 401, "none": 401, "boom": 401}
    assert any("authenticate raised" in r.getMessage() for r in caplog.records)
    assert "database down" in caplog.text


@pytest.mark.parametrize("style", ["sync", "async"])
def test_bytes_behind_the_upgrade_request_wait_for_the_verdict(serve: Serve, style: str) -> None:
    """Reading pauses while the hook decides; a frame sent in the same write as the request is
    handled once the upgrade is accepted."""
    at_verdict: list[tuple[int, dict[str, int]]] = []

    def check(request: UpgradeRequest) -> bool:
        stats = srv.server.stats()  # (on the server's thread)
        at_verdict.append((stats.connections, dict(stats.topics)))
        return True

    srv = serve(authenticate=styled(style, check, lambda: srv.nap(0.05)))
    peer = RawPeer.open(srv.port, "/ws?user_id=eager", after=masked_frame(0x1, b"sub:early"))
    assert peer.recv_text() == HELLO.format("eager")
    eventually(lambda: srv.stats().topics == {"early": 1})
    assert at_verdict == [(0, {})]
    peer.close()


@pytest.mark.parametrize("raises", [False, True], ids=["decides", "raises"])
@pytest.mark.parametrize("style", STYLES)
def test_authorize_subscribe_decides_and_an_exception_refuses(
    serve: Serve, style: str, raises: bool, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[tuple[str, str]] = []

    def decide(conn: AuthorizeSubscription, topic: str) -> bool:
        asked.append((conn.user_id, topic))
        if raises and topic == "secret":
            raise RuntimeError("application bug")
        return topic == "public" or raises

    srv = serve(authorize_subscribe=styled(style, decide, lambda: srv.nap(0.01)))
    with caplog.at_level(logging.ERROR, logger="tank"), ws_client(srv.url + "?user_id=alice") as ws:
        recv_text(ws)
        ws.send("sub:public")
        ws.send("sub:secret")
        eventually(lambda: srv.stats().topics == {"public": 1})
        eventually(lambda: len(asked) == 2)
        assert srv.stats().topics == {"public": 1}  # the refused one never arrives
        assert srv.call(lambda s: s.publish("secret", "no")) == 0
        assert srv.call(lambda s: s.publish("public", "yes")) == 1
        assert json.loads(recv_text(ws)) == {"topic": "public", "data": "yes"}
    assert sorted(asked) == [("alice", "public"), ("alice", "secret")]
    if raises:
        assert "authorize_subscribe raised" in caplog.text


@pytest.mark.parametrize("style", ["sync", "async"])
def test_unsubscribe_before_the_verdict_cancels_it(serve: Serve, style: str) -> None:
    asked: list[str] = []

    def allow(conn: AuthorizeSubscription, topic: str) -> bool:
        asked.append(topic)
        return True

    srv = serve(authorize_subscribe=styled(style, allow, lambda: srv.nap(0.2)))
    peer = RawPeer.open(srv.port)
    peer.recv_text()
    sub, unsub = masked_frame(0x1, b"sub:later"), masked_frame(0x1, b"unsub:later")
    if style == "sync":
        # One write, one read: the hook is asked after the batch, so its verdict comes too late.
        peer.send(sub + unsub)
    else:
        # The unsub arrives while the coroutine hook is still deciding (on a loop that can wait).
        peer.send(sub)
        peer.send(unsub)
    eventually(lambda: asked == ["later"])
    peer.send_text("sub:other")
    eventually(lambda: srv.stats().topics == {"other": 1})
    assert srv.call(lambda s: s.publish("later", "x")) == 0
    peer.close()


@pytest.mark.parametrize(
    ("config", "options"),
    [
        (ServerConfig(authenticate=True), {}),
        (ServerConfig(authorize_subscriptions=True), {}),
        (None, {"hook_queue_size": 0}),
    ],
    ids=["authenticate-without-hook", "authorize-without-hook", "hook-queue-size-0"],
)
def test_what_cannot_work_is_refused_at_start(
    serve: Serve, config: ServerConfig | None, options: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError):
        serve(config, **options)
