"""What is particular to tank_asyncio's server (the behaviour every transport shares is the contract
suite's, tests/contract): its one ``TimerHandle``, no task per connection, ``pause_writing`` and the
transport's write buffer, one ``transport.write`` per loop iteration, a server built but not started."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from asyncio_support import RawPeer, client, eventually, masked_frame, run

import tank_asyncio
from tank_core import LocalProtocolError, ServerConfig

HOST = "127.0.0.1"
QUICK = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)


async def recv_text(ws: Any, timeout: float = 5.0) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str)
    return str(message)


# ---------------------------------------------------------------------- one timer, no tasks


def _our_timer_handles(server: tank_asyncio.Server) -> list[asyncio.TimerHandle]:
    loop = asyncio.get_running_loop()
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    return [
        h for h in scheduled
        if not h.cancelled() and getattr(h, "_callback", None) == server._on_timer
    ]


def _server_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running code of tank_asyncio (none are expected without async hooks)."""
    package = os.path.dirname(tank_asyncio.__file__)
    tasks = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.startswith(package):
            tasks.append(task)
    return tasks


def test_one_timer_for_the_whole_server_and_no_task_per_connection() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(QUICK, HOST, 0) as server:
            peers = [await client(server.url) for _ in range(30)]
            for ws in peers:
                await recv_text(ws)
            tasks_after_connect = len(asyncio.all_tasks())
            # Several heartbeat intervals: pings go out, pongs come back, nobody times out.
            for _ in range(5):
                await asyncio.sleep(0.15)
                handles = _our_timer_handles(server)
                assert len(handles) == 1, handles
                assert handles[0] is server.timer
                deadline = server.core.next_deadline()
                # armed for the earliest deadline (plus the timer's slack), never before it
                assert deadline is not None and handles[0].when() <= deadline + 0.01
            stats = server.stats()
            assert stats.connections == 30
            assert stats.pings_sent >= 30 and stats.pongs_received >= 30
            assert stats.heartbeat_timeouts == 0
            assert _server_tasks() == []
            assert len(asyncio.all_tasks()) == tasks_after_connect
            for ws in peers:
                await ws.close()

    run(main())


# ---------------------------------------------------------------------- the transport's buffer


def test_closing_a_stalled_socket_never_waits_longer_than_close_timeout() -> None:
    # The peer's Close is echoed behind its unsent output; that output can never go, so the
    # socket is dropped close_timeout later instead of lingering forever.
    config = ServerConfig(close_timeout=0.3, max_outbox_bytes=64 * 1024 * 1024)

    async def main() -> None:
        async with tank_asyncio.serve(config, HOST, 0) as server:
            stalled = await RawPeer.open(HOST, server.port, "/ws?user_id=s", rcvbuf=4096)
            await stalled.send_text("sub:big")
            await eventually(lambda: server.stats().topics.get("big") == 1)
            (conn_id,) = server.core.engine.open_connections()
            proto = server._conns[conn_id]
            while proto.writable:  # until the transport is above its high-water mark
                server.publish("big", "y" * 65536)
                await asyncio.sleep(0.001)
            server.publish("big", "y" * 65536)
            await asyncio.sleep(0.01)
            # Output the paused transport cannot take stays in the core and counts there.
            assert server.stats().outbox_bytes >= 65536
            await stalled.send_close(1000)
            await eventually(lambda: server.stats().connections == 0)
            # The Close waits behind the unsent output: the socket is neither written nor closed.
            assert not proto.writable and not proto.gone
            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(lambda: conn_id not in server._conns, timeout=3)
            assert loop.time() - started <= config.close_timeout + 0.3
            stalled.close()

    run(main())


def test_methods_need_a_running_server() -> None:
    context = tank_asyncio.serve(None, HOST, 0)
    with pytest.raises(LocalProtocolError):
        context.server.publish("t", "x")
    assert context.server.stats().connections == 0


def test_what_one_read_queues_for_a_socket_goes_out_in_one_write() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0) as server:
            receiver = await client(server.url + "?user_id=r")
            await recv_text(receiver)
            sender = await RawPeer.open(HOST, server.port, "/ws?user_id=s")
            await eventually(lambda: server.stats().connections == 2)
            (receiver_id,) = [c for c in server.core.engine.open_connections()
                              if server.core.engine.user_of(c) == "r"]
            transport = server._conns[receiver_id].transport
            assert transport is not None
            writes: list[bytes] = []
            real_write = transport.write

            def counting_write(data: Any) -> None:
                writes.append(bytes(data))
                real_write(data)

            transport.write = counting_write  # type: ignore[method-assign]
            # Five relayed messages in one segment: one read, one batch, one write to r.
            sender.writer.write(b"".join(masked_frame(0x1, f"m{i}".encode()) for i in range(5)))
            await sender.writer.drain()
            for i in range(5):
                assert await recv_text(receiver) == f"m{i}"
            assert len(writes) == 1
            sender.close()
            await receiver.close()

    run(main())


def test_a_cancelled_coroutine_hook_stops_neither_the_next_hooks_nor_shutdown() -> None:
    """A coroutine hook that awaits something cancelled raises CancelledError: that is the hook's
    failure (logged); the worker goes on with the next events, and shutdown still returns."""
    calls: list[int] = []

    async def on_connect(event: object) -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future

    async def body() -> None:
        async with tank_asyncio.serve(ServerConfig(), "127.0.0.1", 0, on_connect=on_connect) as server:
            for _ in range(3):
                async with tank_asyncio.connect(server.url) as client:
                    assert client.connected
            for _ in range(100):
                if len(calls) == 3:
                    break
                await asyncio.sleep(0.01)
        # Leaving the block shut the server down: it returned.

    asyncio.run(asyncio.wait_for(body(), 10))
    assert calls == [0, 1, 2]


def test_a_peer_gone_before_our_fin_fails_nothing() -> None:
    """Lingering half-closes the socket (write_eof); when the peer is already gone the kernel says
    ENOTCONN (seen with Chromium closing a tab). That socket is aborted; the server goes on."""
    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0) as server:
            gone = await client(server.url + "?user_id=gone")
            await recv_text(gone)
            stays = await client(server.url + "?user_id=stays")
            await recv_text(stays)
            await eventually(lambda: server.stats().connections == 2)
            (gone_id,) = [c for c in server.core.engine.open_connections()
                          if server.core.engine.user_of(c) == "gone"]
            transport = server._conns[gone_id].transport
            assert transport is not None

            def not_connected() -> None:
                raise OSError(107, "Transport endpoint is not connected")

            transport.write_eof = not_connected  # type: ignore[method-assign]
            assert server.disconnect("gone") == 1  # Close 1000, then our FIN: refused
            await eventually(lambda: server.stats().connections == 1)
            assert server.failure is None
            await stays.send("sub:t")
            await eventually(lambda: server.stats().topics == {"t": 1})
            assert server.publish("t", "still serving") == 1
            assert "still serving" in await recv_text(stays)
            await stays.close()

    run(main())
