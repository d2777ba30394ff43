"""The contract, part 4: stopping. A graceful stop flushes what is queued, says ``Server is
shutting down``, closes 1001 and is over within ``close_timeout`` + 1 s even when peers never
answer; commands afterwards raise ``LocalProtocolError``; a failure of the core aborts every
socket and is re-raised where the server was started."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from contract_support import (
    SHUTDOWN_TEXT,
    RawPeer,
    Serve,
    Served,
    eventually,
    recv_text,
    ws_client,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from tank_core import LocalProtocolError, ServerConfig
from tank_core.notifications import ClientDisconnected

HOW = ["idiom", "shutdown"]
GRACEFUL = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=1.0)


def until_closed(ws: ClientConnection) -> list[str]:
    texts = []
    try:
        while True:
            texts.append(recv_text(ws))
    except ConnectionClosed:
        return texts


def assert_refuses_commands(server: Any) -> None:
    for command in (
        lambda: server.publish("t", "d"),
        lambda: server.broadcast("d"),
        lambda: server.send("u", "d"),
        lambda: server.disconnect("u"),
    ):
        with pytest.raises(LocalProtocolError):
            command()
    assert server.stats().shutting_down  # stats() still answers


def stop(srv: Served, how: str) -> float:
    """``idiom``: the ecosystem's way (asyncio: leave the block; trio: cancel the scope running
    ``serve``; selectors: ``shutdown()``). ``shutdown``: the adapter's ``shutdown()``, twice."""
    if how == "idiom":
        return srv.stop()
    started = time.monotonic()
    srv.request_shutdown()
    srv.request_shutdown()  # a second call changes nothing
    return srv.wait_stopped(started=started)


@pytest.mark.parametrize("how", HOW)
def test_a_graceful_stop_flushes_then_says_goodbye_then_1001(serve: Serve, how: str) -> None:
    disconnects: list[ClientDisconnected] = []
    srv = serve(GRACEFUL, on_disconnect=disconnects.append)
    clients = [ws_client(srv.url + f"?user_id=c{i}") for i in range(3)]
    for ws in clients:
        recv_text(ws)
    assert srv.call(lambda s: s.broadcast("before")) == 3
    assert srv.call(lambda s: s.broadcast("the end")) == 3
    elapsed = stop(srv, how)
    assert elapsed < GRACEFUL.close_timeout  # every client answered our Close: no waiting
    for ws in clients:
        assert until_closed(ws) == ["before", "the end", SHUTDOWN_TEXT]
        assert ws.close_code == 1001
    assert sorted((d.user_id, d.code) for d in disconnects) == [("c0", 1001), ("c1", 1001), ("c2", 1001)]
    server = srv.server  # the thread is over: safe to touch from here
    assert server.stats().connections == 0
    assert server.core.connection_ids() == ()
    assert_refuses_commands(server)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


@pytest.mark.parametrize("how", HOW)
def test_shutdown_is_bounded_by_close_timeout_when_peers_never_answer(serve: Serve, how: str) -> None:
    config = ServerConfig(heartbeat_interval=5, heartbeat_timeout=15, close_timeout=0.4)
    srv = serve(config)
    mute = [RawPeer.open(srv.port) for _ in range(3)]
    for peer in mute:
        peer.recv_text()  # then never read nor answer again
    elapsed = stop(srv, how)
    assert config.close_timeout - 0.05 <= elapsed < config.close_timeout + 1.0
    for peer in mute:  # the goodbye, the Close, then TCP dropped
        texts, code, _reason = peer.until_close()
        assert (texts, code) == ([SHUTDOWN_TEXT], 1001)
        assert peer.at_eof()
        peer.close()
    assert srv.server.core.connection_ids() == ()


def test_queued_coroutine_hooks_see_the_disconnects_of_a_shutdown(serve: Serve) -> None:
    seen: list[str] = []

    async def on_event(event: Any) -> None:
        await srv.nap(0.01)
        seen.append(type(event).__name__)

    srv = serve(GRACEFUL, on_event=on_event)
    ws = ws_client(srv.url)
    recv_text(ws)
    eventually(lambda: seen == ["ClientConnected"])
    assert srv.stop() < 1.0
    assert seen == ["ClientConnected", "ClientDisconnected"]
    ws.close()


def test_a_failure_in_the_core_aborts_every_socket_and_is_reraised(serve: Serve) -> None:
    srv = serve()
    ws = ws_client(srv.url)
    recv_text(ws)

    def broken(event: Any) -> Any:
        raise RuntimeError("core bug")

    srv.call(lambda s: setattr(s.core, "receive", broken))  # the next event poisons the server
    ws.send("anything")
    with pytest.raises(ConnectionClosed):
        recv_text(ws)
    assert ws.close_code == 1006  # aborted: no Close frame
    with pytest.raises(RuntimeError, match="core bug"):
        srv.wait_stopped(5)  # the server stopped on its own and re-raised the failure
    assert srv.server.closing
    with pytest.raises(LocalProtocolError) as info:
        srv.server.publish("t", "x")
    assert isinstance(info.value.__cause__, RuntimeError)
