"""``TankASGI`` driven in-process through the ASGI interface itself, on asyncio and on trio (anyio),
for what no ASGI server shows end to end:

- the end of the lifespan says goodbye (``Server is shutting down``, then Close 1001) to the
  WebSockets still open: uvicorn and hypercorn end their WebSockets before they end the lifespan
  (test_asgi_protocol.py::test_sigterm_what_clients_see), an application's own lifespan need not;
- a refused upgrade without the denial-response extension is a ``websocket.close`` before the
  accept (which servers answer with 403), with it the HTTP answer itself;
- without its lifespan, Tank refuses WebSockets with 1013 and HTTP with 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from tank_asgi import AsgiUpgradeRequest, TankASGI
from tank_core import ServerConfig

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

DENIAL = {"websocket.http.response": {}}


def ws_scope(query: bytes = b"user_id=alice", extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "scheme": "ws", "path": "/ws", "raw_path": b"/ws", "root_path": "",
        "query_string": query, "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "subprotocols": [],
        "extensions": DENIAL if extensions is None else extensions,
    }


class Peer:
    """The ASGI server's side of one WebSocket: what the application sent, and a client that
    answers a Close with a Close (``websocket.disconnect`` with the same code)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.inbox, self.outbox = anyio.create_memory_object_stream[dict[str, Any]](16)
        self.inbox.send_nowait({"type": "websocket.connect"})
        self.changed = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.outbox.receive()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(dict(message))
        self.changed.set()
        self.changed = anyio.Event()
        if message["type"] == "websocket.close":
            await self.inbox.send({"type": "websocket.disconnect", "code": message.get("code", 1000)})

    async def until(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        with anyio.fail_after(3):
            while not predicate(self.sent):
                await self.changed.wait()

    def texts(self) -> list[str]:
        return [m["text"] for m in self.sent if m["type"] == "websocket.send"]


@pytest.mark.anyio
async def test_end_of_lifespan_says_goodbye_then_1001() -> None:
    tank = TankASGI(ServerConfig(heartbeat_interval=30, heartbeat_timeout=60, close_timeout=1))
    peers = [Peer(), Peer()]
    async with anyio.create_task_group() as tasks:
        async with tank.lifespan():
            assert tank.running
            for i, peer in enumerate(peers):
                tasks.start_soon(tank, ws_scope(b"user_id=u%d" % i), peer.receive, peer.send)
            for i, peer in enumerate(peers):
                await peer.until(lambda sent, i=i: f"Hello, u{i}! Welcome to WebSocket server." in
                                 [m.get("text") for m in sent])
            await peers[0].inbox.send({"type": "websocket.receive", "text": "sub:t"})
            with anyio.fail_after(3):
                while tank.stats().topics != {"t": 1}:
                    await anyio.sleep(0.01)
            assert tank.publish("t", "last") == 1
        # The lifespan is over: everyone got the goodbye and 1001, and the handlers returned.
        assert not tank.running
    for i, peer in enumerate(peers):
        assert peer.sent[0] == {"type": "websocket.accept"}
        assert peer.sent[-1]["type"] == "websocket.close" and peer.sent[-1]["code"] == 1001
        expected = [f"Hello, u{i}! Welcome to WebSocket server."]
        if i == 0:
            expected.append('{"topic":"t","data":"last"}')  # pending output goes first
        assert peer.texts() == [*expected, "Server is shutting down"]


@pytest.mark.anyio
@pytest.mark.parametrize("extensions,expected", [
    (DENIAL, [{"type": "websocket.http.response.start", "status": 401}]),
    ({}, [{"type": "websocket.close", "code": 1008}]),  # servers answer it with 403
])
async def test_refused_upgrade_with_and_without_the_denial_extension(
    extensions: dict[str, Any], expected: list[dict[str, Any]]
) -> None:
    seen: list[object] = []

    def authenticate(request: AsgiUpgradeRequest) -> bool:
        seen.append(request)
        return False

    tank = TankASGI(authenticate=authenticate)
    scope = ws_scope(b"user_id=alice&token=x", extensions)
    peer = Peer()
    async with tank.lifespan():
        with anyio.fail_after(3):
            await tank(scope, peer.receive, peer.send)
    assert [{k: m[k] for k in e} for m, e in zip(peer.sent, expected, strict=False)] == expected
    if extensions:
        assert [m["type"] for m in peer.sent] == ["websocket.http.response.start",
                                                  "websocket.http.response.body"]
        assert b"Unauthorized" in peer.sent[1]["body"]
    else:
        assert len(peer.sent) == 1
    # The hook got the ASGI scope with the request.
    assert len(seen) == 1 and isinstance(seen[0], AsgiUpgradeRequest)
    assert seen[0].scope is scope and seen[0].user_id == "alice"
    assert seen[0].query_value("token") == "x"


@pytest.mark.anyio
async def test_without_its_lifespan_tank_refuses_with_1013_and_503() -> None:
    tank = TankASGI(http=True)
    peer = Peer()
    with anyio.fail_after(3):
        await tank(ws_scope(), peer.receive, peer.send)
    assert peer.sent == [{"type": "websocket.close", "code": 1013}]

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**ws_scope(), "type": "http", "method": "GET", "path": "/healthz"}
    with anyio.fail_after(3):
        await tank(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
