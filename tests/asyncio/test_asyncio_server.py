"""The embedding API of tank_asyncio over real sockets on 127.0.0.1 (docs/embedding.md)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from asyncio_support import RawPeer, client, eventually, masked_frame, run
from websockets.exceptions import ConnectionClosed, InvalidStatus

import tank_asyncio
from tank_core import (
    ClientConnected,
    ClientDisconnected,
    ConfigError,
    ErrorOccurred,
    LocalProtocolError,
    MessageReceived,
    Notification,
    ServerConfig,
    TopicSubscribed,
    UpgradeRequest,
)

HOST = "127.0.0.1"
QUICK = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)


async def recv_text(ws: Any, timeout: float = 5.0) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str)
    return str(message)


async def recv_non_heartbeat(ws: Any) -> str:
    while True:
        message = await recv_text(ws)
        if message != "heartbeat":
            return message


# ---------------------------------------------------------------------- hooks and the server object


def test_hooks_are_called_with_their_events() -> None:
    seen: list[Notification] = []
    connected: list[ClientConnected] = []
    disconnected: list[ClientDisconnected] = []
    messages: list[MessageReceived] = []

    async def main() -> None:
        async with tank_asyncio.serve(
            None,
            HOST,
            0,
            on_connect=connected.append,
            on_disconnect=disconnected.append,
            on_message=messages.append,
            on_event=seen.append,
        ) as server:
            assert server.url == f"ws://{HOST}:{server.port}/ws"
            assert server.port != 0
            ws = await client(server.url + "?user_id=alice")
            assert await recv_text(ws) == "Hello, alice! Welcome to WebSocket server."
            await ws.send("sub:news")
            await ws.send("hello everyone")
            await eventually(lambda: len(messages) == 1)
            await ws.close()
            await eventually(lambda: len(disconnected) == 1)

    run(main())
    assert [e.user_id for e in connected] == ["alice"]
    assert messages[0].text == "hello everyone" and messages[0].user_id == "alice"
    assert disconnected[0].code == 1000
    kinds = [type(e) for e in seen]
    assert kinds[:3] == [ClientConnected, TopicSubscribed, MessageReceived]
    assert kinds[-1] is ClientDisconnected


def test_publish_broadcast_send_disconnect_return_counts() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0) as server:
            a1 = await client(server.url + "?user_id=a")
            a2 = await client(server.url + "?user_id=a")
            b = await client(server.url + "?user_id=b")
            for ws in (a1, a2, b):
                await recv_text(ws)  # Hello
            await a1.send("sub:news")
            await b.send("sub:news")
            await eventually(lambda: server.stats().topics.get("news") == 2)

            assert server.publish("news", "<hot>") == 2
            expected = '{"topic":"news","data":"\\u003chot\\u003e"}'
            assert await recv_text(a1) == expected
            assert await recv_text(b) == expected
            assert server.publish("nobody", "x") == 0

            assert server.broadcast("to all") == 3
            for ws in (a1, a2, b):
                assert await recv_text(ws) == "to all"
            b_id = next(c for c in server.core.connection_ids() if server.core.engine.is_open(c)
                        and server.core.engine.user_of(c) == "b")
            assert server.broadcast("not b", exclude=b_id) == 2
            assert await recv_text(a1) == "not b"
            assert await recv_text(a2) == "not b"

            assert server.send("a", "just a") == 2
            assert await recv_text(a1) == "just a"
            assert await recv_text(a2) == "just a"
            assert server.send("ghost", "x") == 0

            assert server.disconnect("a") == 2
            for ws in (a1, a2):
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            await eventually(lambda: server.stats().connections == 1)
            assert server.stats().messages_out >= 8
            await b.close()

    run(main())


def test_leaving_the_context_shuts_down_gracefully() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(QUICK, HOST, 0) as server:
            ws = await client(server.url)
            await recv_text(ws)
            await ws.send("sub:t")
            await eventually(lambda: server.stats().topics.get("t") == 1)
            port = server.port
        # The block has returned: goodbye text, Close 1001, listener gone.
        assert server.closing
        assert await recv_non_heartbeat(ws) == "Server is shutting down"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert server.stats().connections == 0
        assert server.core.connection_ids() == ()
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        with pytest.raises(LocalProtocolError):
            server.publish("t", "late")
        assert server.stats().shutting_down

    run(main())


def test_explicit_shutdown_returns_when_everyone_is_gone_and_is_idempotent() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(QUICK, HOST, 0) as server:
            peers = [await client(server.url) for _ in range(5)]
            for ws in peers:
                await recv_text(ws)
            await asyncio.gather(server.shutdown(), server.shutdown())
            assert server.stats().connections == 0
            assert server.core.connection_ids() == ()
            await server.wait_closed()
            for ws in peers:
                await ws.wait_closed()
                assert ws.close_code == 1001

    run(main())


def test_shutdown_with_a_peer_that_never_answers_is_bounded_by_close_timeout() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(QUICK, HOST, 0) as server:
            peer = await RawPeer.open(HOST, server.port, "/ws")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.shutdown()
            elapsed = loop.time() - started
            assert elapsed < QUICK.close_timeout + 0.5
            assert server.core.connection_ids() == ()
            peer.close()

    run(main())


# ---------------------------------------------------------------------- authentication


@pytest.mark.parametrize("style", ["sync", "async"])
def test_authenticate_accepts_and_refuses_with_401(style: str) -> None:
    requests: list[UpgradeRequest] = []

    def check(request: UpgradeRequest) -> bool:
        requests.append(request)
        return request.query_value("token") == "secret"

    async def check_async(request: UpgradeRequest) -> bool:
        await asyncio.sleep(0.01)
        return check(request)

    hook = check if style == "sync" else check_async

    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0, authenticate=hook) as server:
            ws = await client(server.url + "?user_id=u&token=secret")
            assert await recv_text(ws) == "Hello, u! Welcome to WebSocket server."
            with pytest.raises(InvalidStatus) as refused:
                await client(server.url + "?user_id=u&token=wrong")
            assert refused.value.response.status_code == 401
            assert refused.value.response.body == b"Unauthorized"
            await ws.send("still fine")
            await ws.close()
            assert server.stats().connections_total == 1

    run(main())
    assert [r.query_value("token") for r in requests] == ["secret", "wrong"]
    assert requests[0].user_id == "u" and requests[0].path == "/ws"


def test_authenticate_status_and_exception() -> None:
    def hook(request: UpgradeRequest) -> object:
        token = request.query_value("token")
        if token == "boom":
            raise RuntimeError("database down")
        if token == "banned":
            return 403
        return True

    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0, authenticate=hook) as server:
            with pytest.raises(InvalidStatus) as refused:
                await client(server.url + "?token=banned")
            assert refused.value.response.status_code == 403
            with pytest.raises(InvalidStatus) as refused:
                await client(server.url + "?token=boom")
            assert refused.value.response.status_code == 401
            ws = await client(server.url + "?token=ok")
            await recv_text(ws)
            await ws.close()

    run(main())


def test_config_authenticate_without_a_hook_is_refused_at_start() -> None:
    with pytest.raises(ConfigError):
        tank_asyncio.serve(ServerConfig(authenticate=True), HOST, 0)


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


def test_a_silent_peer_is_closed_and_the_others_stay() -> None:
    timeouts: list[Notification] = []

    async def main() -> None:
        async with tank_asyncio.serve(QUICK, HOST, 0, on_event=timeouts.append) as server:
            good = await client(server.url + "?user_id=good")
            silent = await RawPeer.open(HOST, server.port, "/ws?user_id=silent")
            await recv_text(good)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(lambda: server.stats().heartbeat_timeouts == 1, timeout=3)
            elapsed = loop.time() - started
            assert QUICK.heartbeat_timeout - 0.05 <= elapsed <= QUICK.heartbeat_timeout + 0.5
            assert server.stats().connections == 1
            await good.send("sub:x")
            await eventually(lambda: server.stats().topics.get("x") == 1)
            assert server.publish("x", "still here") == 1
            assert await recv_non_heartbeat(good) == '{"topic":"x","data":"still here"}'
            silent.close()
            await good.close()

    run(main())
    errors = [e for e in timeouts if isinstance(e, ErrorOccurred)]
    assert any(e.code == 1005 and e.user_id == "silent" for e in errors)


# ---------------------------------------------------------------------- writes and backpressure


def test_a_stalled_reader_is_closed_1008_and_the_others_get_everything() -> None:
    config = ServerConfig(heartbeat_interval=5, heartbeat_timeout=15, close_timeout=0.5,
                          max_outbox_bytes=512 * 1024)
    payload = "x" * 65536

    async def main() -> None:
        async with tank_asyncio.serve(config, HOST, 0) as server:
            good = await client(server.url + "?user_id=good", max_size=None, max_queue=None)
            await recv_text(good)
            await good.send("sub:big")
            stalled = await RawPeer.open(HOST, server.port, "/ws?user_id=stalled", rcvbuf=4096)
            await stalled.send_text("sub:big")
            await eventually(lambda: server.stats().topics.get("big") == 2)

            received: list[str] = []

            async def consume() -> None:
                while True:
                    received.append(await recv_text(good))

            consumer = asyncio.get_running_loop().create_task(consume())
            sent = 0
            while server.stats().slow_consumer_closes == 0:
                assert sent < 2000, "the stalled reader was never closed"
                server.publish("big", payload)
                sent += 1
                await asyncio.sleep(0.002)
            # The stalled one is gone within close_timeout; the good one got every message.
            await eventually(lambda: server.stats().connections == 1, timeout=3)
            await eventually(lambda: len(received) == sent, timeout=10)
            assert all(m == received[0] for m in received)
            consumer.cancel()
            stalled.close()
            await good.close()

    run(main())


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
            while not proto.held:
                server.publish("big", "y" * 65536)
                await asyncio.sleep(0.001)
            assert server.stats().outbox_bytes >= sum(map(len, proto.held))
            await stalled.send_close(1000)
            await eventually(lambda: server.stats().connections == 0)
            assert proto.held  # the Close waits behind the unsent output
            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(lambda: conn_id not in server._conns, timeout=3)
            assert loop.time() - started <= config.close_timeout + 0.3
            stalled.close()

    run(main())


def test_a_hook_that_raises_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    def bad(event: MessageReceived) -> None:
        raise RuntimeError("application bug")

    async def bad_async(event: Notification) -> None:
        raise ValueError("async application bug")

    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0, on_message=bad, on_event=bad_async) as server:
            a = await client(server.url + "?user_id=a")
            b = await client(server.url + "?user_id=b")
            await recv_text(a)
            await recv_text(b)
            await a.send("one")
            await a.send("two")
            assert await recv_text(b) == "one"
            assert await recv_text(b) == "two"
            await b.send("sub:t")
            await eventually(lambda: server.stats().topics.get("t") == 1)
            assert server.publish("t", "fine") == 1
            assert await recv_text(b) == '{"topic":"t","data":"fine"}'
            await a.close()
            await b.close()

    with caplog.at_level(logging.ERROR, logger="tank"):
        run(main())
    assert "application bug" in caplog.text
    assert "async application bug" in caplog.text


def test_async_hooks_that_fall_behind_drop_and_count_events() -> None:
    release = asyncio.Event()
    handled: list[Notification] = []

    async def slow(event: Notification) -> None:
        await release.wait()
        handled.append(event)

    async def main() -> None:
        async with tank_asyncio.serve(
            None, HOST, 0, on_event=slow, hook_queue_size=4
        ) as server:
            ws = await client(server.url)
            await recv_text(ws)
            for i in range(30):
                await ws.send(f"sub:t{i}")
            await eventually(lambda: len(server.stats().topics) == 30)
            # The protocol did not wait for the application.
            assert server.publish("t29", "x") == 1
            assert await recv_text(ws) == '{"topic":"t29","data":"x"}'
            # 31 events (connect + 30 subscribes): one in the worker, 4 queued, the rest dropped.
            assert server.dropped_events == 31 - 1 - 4
            release.set()
            await eventually(lambda: len(handled) == 5)
            await ws.close()

    run(main())


def test_a_failure_in_the_core_closes_everyone_and_is_raised_from_serve() -> None:
    async def main() -> None:
        server: tank_asyncio.Server | None = None
        with pytest.raises(RuntimeError, match="core bug"):
            async with tank_asyncio.serve(None, HOST, 0) as server:
                ws = await client(server.url)
                await recv_text(ws)

                def broken(*args: Any, **kwargs: Any) -> Any:
                    raise RuntimeError("core bug")

                server.core.engine.message_received = broken  # type: ignore[method-assign]
                await ws.send("anything")
                await server.wait_closed()
                await ws.wait_closed()
        assert server is not None and server.closing

    run(main())


def test_methods_need_a_running_server() -> None:
    context = tank_asyncio.serve(None, HOST, 0)
    with pytest.raises(LocalProtocolError):
        context.server.publish("t", "x")
    assert context.server.stats().connections == 0


def test_http_api_and_listener_on_the_same_port() -> None:
    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0) as server:
            ws = await client(server.url)
            await recv_text(ws)
            await ws.send("sub:news")
            await eventually(lambda: server.stats().topics.get("news") == 1)
            reader, writer = await asyncio.open_connection(HOST, server.port)
            body = b'{"topic":"news","data":"via http"}'
            writer.write(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            assert await reader.readexactly(length) == b'{"delivered":1}'
            assert await recv_text(ws) == '{"topic":"news","data":"via http"}'
            writer.close()
            await ws.close()

    run(main())


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
