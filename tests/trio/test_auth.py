"""The ``authenticate`` hook under trio: plain or coroutine, True / False / a status / an exception."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from trio_helpers import QUICK, RawClient, run, start
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from wsproto.events import Request

from tank_core import ErrorOccurred, UpgradeRequest


def token_is_ok(request: UpgradeRequest) -> bool:
    return request.query_value("token") == "ok"


async def token_is_ok_later(request: UpgradeRequest) -> bool:
    await trio.sleep(0.05)
    return request.query_value("token") == "ok"


def attempt(url: str) -> int | str:
    """Connect with the websockets library: the Hello text, or the HTTP status of a refusal."""
    try:
        with connect(url) as ws:
            hello = ws.recv(timeout=5)
            assert isinstance(hello, str)
            return hello
    except InvalidStatus as exc:
        return exc.response.status_code


def attempts(hook: Any, *targets: str, **hooks: Any) -> list[int | str]:
    results: list[int | str] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, authenticate=hook, **hooks)
            for target in targets:
                results.append(await trio.to_thread.run_sync(attempt, server.url + target))
            nursery.cancel_scope.cancel()

    run(body)
    return results


@pytest.mark.parametrize("hook", [token_is_ok, token_is_ok_later], ids=["sync", "async"])
def test_accept_and_refuse_with_401(hook: Any) -> None:
    errors: list[ErrorOccurred] = []
    ok, refused = attempts(hook, "?token=ok&user_id=u1", "?token=bad", on_error=errors.append)
    assert ok == "Hello, u1! Welcome to WebSocket server."
    assert refused == 401
    assert [e.code for e in errors] == [1007]  # the reference's "authentication failed"


def test_the_hook_sees_the_whole_request() -> None:
    seen: list[UpgradeRequest] = []

    def hook(request: UpgradeRequest) -> bool:
        seen.append(request)
        return True

    (hello,) = attempts(hook, "?user_id=ann&token=abc")
    assert hello == "Hello, ann! Welcome to WebSocket server."
    request = seen[0]
    assert request.path == "/ws"
    assert request.user_id == "ann"
    assert request.query_value("token") == "abc"
    assert request.header("Upgrade") == "websocket"
    assert request.peer_host == "127.0.0.1"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_an_int_is_the_refusal_status(is_async: bool) -> None:
    def forbid(request: UpgradeRequest) -> int:
        return 403

    async def forbid_later(request: UpgradeRequest) -> int:
        return 403

    assert attempts(forbid_later if is_async else forbid, "") == [403]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_an_exception_is_a_refusal(is_async: bool, caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: UpgradeRequest) -> bool:
        raise RuntimeError("database down")

    async def broken_later(request: UpgradeRequest) -> bool:
        raise RuntimeError("database down")

    with caplog.at_level(logging.ERROR, logger="tank"):
        assert attempts(broken_later if is_async else broken, "", "") == [401, 401]
    assert any("authenticate raised" in r.getMessage() for r in caplog.records)


def test_odd_answers_refuse() -> None:
    assert attempts(lambda request: "yes", "") == [401]
    assert attempts(lambda request: 200, "") == [401]


def test_a_callable_returning_a_coroutine_is_awaited() -> None:
    class Checker:
        async def __call__(self, request: UpgradeRequest) -> bool:
            return request.query_value("token") == "ok"

    assert attempts(Checker(), "?token=ok&user_id=q", "") == [
        "Hello, q! Welcome to WebSocket server.",
        401,
    ]


def masked_text_frame(text: str, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client's masked, final text frame (RFC 6455 §5.2), short payloads only."""
    payload = text.encode()
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + masked


def test_bytes_behind_the_request_wait_for_the_verdict() -> None:
    """Reading pauses while the hook runs; a frame sent in the same write as the request is
    handled once the upgrade is accepted."""
    release = trio.Event()

    async def wait_then_yes(request: UpgradeRequest) -> bool:
        await release.wait()
        return True

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, authenticate=wait_then_yes)
            client = RawClient(await trio.open_tcp_stream("127.0.0.1", server.port), auto_pong=True)
            head = client.ws.send(Request(host="x", target="/ws?user_id=eager"))
            await client.stream.send_all(head + masked_text_frame("sub:early"))
            await trio.sleep(0.1)
            assert server.stats().connections == 0  # the verdict is pending
            assert server.stats().topics == {}
            release.set()
            event = await client.next_event()
            assert type(event).__name__ == "AcceptConnection"
            assert await client.recv_text() == "Hello, eager! Welcome to WebSocket server."
            with trio.fail_after(5):
                while server.stats().topics.get("early") != 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    run(body)
