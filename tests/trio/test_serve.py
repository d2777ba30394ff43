"""tank_trio over real sockets: the handshake, hooks, and the server object's commands and counts."""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import pytest
import trio
from trio_helpers import FAST, QUICK, RawClient, run, start
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import tank_trio
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
)

HELLO = "Hello, {}! Welcome to WebSocket server."


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def test_nursery_start_with_plain_arguments_and_url() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(tank_trio.serve, None, "127.0.0.1", 0)
            assert isinstance(server, tank_trio.Server)
            assert server.host == "127.0.0.1"
            assert server.port > 0
            assert server.url == f"ws://127.0.0.1:{server.port}/ws"
            client = await RawClient.connect(server.port, "/ws?user_id=ann")
            assert await client.recv_text() == HELLO.format("ann")
            await client.aclose()
            nursery.cancel_scope.cancel()

    run(body)


def test_hooks_are_called_with_the_core_notifications() -> None:
    seen: list[Notification] = []
    connects: list[ClientConnected] = []
    messages: list[MessageReceived] = []
    disconnects: list[ClientDisconnected] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(
                nursery,
                on_connect=connects.append,
                on_message=messages.append,
                on_disconnect=disconnects.append,
                on_event=seen.append,
            )

            def client() -> None:
                with connect(server.url + "?user_id=bob") as ws:
                    assert ws.recv() == HELLO.format("bob")
                    ws.send("sub:news")
                    ws.send("hello everyone")
                    ws.send('{"type":"heartbeat"}')
                    trio.from_thread.run(wait_for, lambda: len(messages) == 1)

            await trio.to_thread.run_sync(client)
            await wait_for(lambda: disconnects)
            nursery.cancel_scope.cancel()

    run(body)
    assert [c.user_id for c in connects] == ["bob"]
    assert [m.text for m in messages] == ["hello everyone"]
    assert [(d.user_id, d.code) for d in disconnects] == [("bob", 1000)]
    kinds = [type(e).__name__ for e in seen]
    assert kinds == ["ClientConnected", "TopicSubscribed", "MessageReceived", "ClientDisconnected"]
    assert isinstance(seen[1], TopicSubscribed) and seen[1].topic == "news"


def test_async_hooks_run_in_order_on_the_worker() -> None:
    seen: list[str] = []

    async def on_event(event: Notification) -> None:
        await trio.sleep(0)
        seen.append(type(event).__name__)

    async def on_connect(event: ClientConnected) -> None:
        seen.append("connect:" + event.user_id)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, on_event=on_event, on_connect=on_connect)
            client = await RawClient.connect(server.port, "/ws?user_id=cy")
            await client.recv_text()
            await client.send_text("sub:a")
            await wait_for(lambda: "TopicSubscribed" in seen)
            await client.aclose()
            await wait_for(lambda: "ClientDisconnected" in seen)
            assert server.dropped_events == 0
            nursery.cancel_scope.cancel()

    run(body)
    assert seen == ["connect:cy", "ClientConnected", "TopicSubscribed", "ClientDisconnected"]


def test_publish_broadcast_send_disconnect_return_counts() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK)
            a = await RawClient.connect(server.port, "/ws?user_id=a")
            b1 = await RawClient.connect(server.port, "/ws?user_id=b")
            b2 = await RawClient.connect(server.port, "/ws?user_id=b")
            for c in (a, b1, b2):
                await c.recv_text()
            await a.send_text("sub:news")
            await b1.send_text("sub:news")
            await wait_for(lambda: server.stats().topics.get("news") == 2)

            assert server.publish("news", "<hot>") == 2
            expected = json.dumps({"topic": "news", "data": "<hot>"}, separators=(",", ":"))
            assert json.loads(await a.recv_text()) == json.loads(expected)
            assert json.loads(await b1.recv_text()) == {"topic": "news", "data": "<hot>"}
            assert server.publish("nobody", "x") == 0

            assert server.broadcast("to all") == 3
            for c in (a, b1, b2):
                assert await c.recv_text() == "to all"
            assert server.broadcast("not a", exclude=1) == 2  # connection ids start at 1
            assert await b1.recv_text() == "not a"
            assert await b2.recv_text() == "not a"

            assert server.send("b", "for b") == 2
            assert await b1.recv_text() == "for b"
            assert await b2.recv_text() == "for b"
            assert server.send("nobody", "x") == 0

            assert server.disconnect("b") == 2
            for c in (b1, b2):
                close = await c.recv_until_close()
                assert close.code == 1000
            assert server.disconnect("b") == 0
            await a.send_text("still here")  # relay: nobody else left
            await wait_for(lambda: server.stats().messages_in == 3)
            assert server.stats().connections == 1
            stats = server.stats()
            assert stats.messages_in >= 3
            assert stats.messages_out >= 8
            nursery.cancel_scope.cancel()

    run(body)


def test_relay_reaches_every_other_client() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK)
            clients = [await RawClient.connect(server.port) for _ in range(3)]
            for c in clients:
                await c.recv_text()
            await clients[0].send_text("hi all")
            assert await clients[1].recv_text() == "hi all"
            assert await clients[2].recv_text() == "hi all"
            with trio.move_on_after(0.2):
                await clients[0].recv_text()
                raise AssertionError("relayed back to the sender")
            nursery.cancel_scope.cancel()

    run(body)


def test_http_api_on_the_same_port() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK)
            client = await RawClient.connect(server.port, "/ws?user_id=z")
            await client.recv_text()
            await client.send_text("sub:t")
            await wait_for(lambda: server.stats().topics.get("t") == 1)

            async def http(request: bytes) -> bytes:
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.send_all(request)
                chunks = []
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
                await stream.aclose()
                return b"".join(chunks)

            answer = await http(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200")
            body_ = b'{"topic":"t","data":"via api"}'
            answer = await http(
                b"POST /api/publish HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body_), body_)
            )
            assert answer.startswith(b"HTTP/1.1 200")
            assert answer.endswith(b'{"delivered":1}') or b'"delivered": 1' in answer
            assert json.loads(await client.recv_text())["data"] == "via api"
            answer = await http(b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404")
            nursery.cancel_scope.cancel()

    run(body)


def test_peer_that_vanishes_is_reported_1006() -> None:
    disconnects: list[ClientDisconnected] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST, on_disconnect=disconnects.append)
            client = await RawClient.connect(server.port)
            await client.recv_text()
            await client.aclose()  # no closing handshake
            await wait_for(lambda: disconnects)
            assert server.stats().connections == 0
            nursery.cancel_scope.cancel()

    run(body)
    assert disconnects[0].code == 1006


def test_garbage_gets_1002_and_the_server_keeps_serving() -> None:
    errors: list[ErrorOccurred] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, on_error=errors.append)
            bad = await RawClient.connect(server.port)
            await bad.recv_text()
            await bad.stream.send_all(b"\xff\xff\xff\xff garbage")  # reserved bits, bad opcode
            data = b""
            with trio.fail_after(5):
                while chunk := await bad.stream.receive_some(4096):
                    data += chunk
            assert data[:2] == b"\x88\x02" or data[0] == 0x88
            assert int.from_bytes(data[2:4], "big") == 1002
            good = await RawClient.connect(server.port)
            assert (await good.recv_text()).startswith("Hello, ")
            nursery.cancel_scope.cancel()

    run(body)
    assert errors and errors[0].code == 1003  # the reference's "read error" event code


def test_authenticate_flag_without_hook_is_a_config_error() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConfigError):
                await start(nursery, ServerConfig(authenticate=True))

    run(body)


def test_commands_after_shutdown_raise_except_stats() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)
            await server.shutdown()
            for call in (
                functools.partial(server.publish, "t", "d"),
                functools.partial(server.broadcast, "d"),
                functools.partial(server.send, "u", "d"),
                functools.partial(server.disconnect, "u"),
            ):
                with pytest.raises(LocalProtocolError):
                    call()
            assert server.stats().shutting_down
            await server.shutdown()  # a second call returns at once

    run(body)


def test_bad_arguments_raise_local_protocol_error_and_the_server_goes_on() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)
            with pytest.raises(LocalProtocolError):
                server.publish(b"bytes topic", "d")  # type: ignore[arg-type]
            assert server.publish("t", "d") == 0
            nursery.cancel_scope.cancel()

    run(body)


def test_a_hook_that_raises_does_not_break_the_server(caplog: pytest.LogCaptureFixture) -> None:
    received: list[str] = []

    def on_message(event: MessageReceived) -> None:
        received.append(event.text)
        raise RuntimeError("application bug")

    async def on_event(event: Notification) -> None:
        raise ValueError("async application bug")

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, on_message=on_message, on_event=on_event)
            a = await RawClient.connect(server.port)
            b = await RawClient.connect(server.port)
            await a.recv_text()
            await b.recv_text()
            await a.send_text("one")
            assert await b.recv_text() == "one"  # relayed although the hook raised
            await a.send_text("two")
            assert await b.recv_text() == "two"
            await b.send_text("sub:x")
            await wait_for(lambda: server.stats().topics.get("x") == 1)
            assert server.publish("x", "still works") == 1
            assert json.loads(await b.recv_text())["data"] == "still works"
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="tank"):
        run(body)
    assert received == ["one", "two"]
    messages = [r.getMessage() for r in caplog.records if r.name == "tank"]
    assert any("on_message" in m for m in messages)
    assert any("on_event" in m for m in messages)


def test_async_hook_queue_overflow_is_dropped_and_counted() -> None:
    release = trio.Event()
    handled: list[str] = []

    async def on_event(event: Notification) -> None:
        await release.wait()
        handled.append(type(event).__name__)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, on_event=on_event)
            client = await RawClient.connect(server.port)
            await client.recv_text()
            for i in range(1500):
                await client.send_text(f"sub:t{i}")
            await wait_for(lambda: len(server.stats().topics) == 1500)
            # One ClientConnected is being handled (blocked); 1024 wait in the queue; the rest drop.
            assert server.dropped_events == 1500 + 1 - 1 - 1024
            release.set()
            await wait_for(lambda: len(handled) == 1 + 1024)
            nursery.cancel_scope.cancel()

    run(body, timeout=30)


def test_sync_client_close_codes_seen_by_websockets_library() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)

            def client() -> int | None:
                with connect(server.url + "?user_id=kim") as ws:
                    ws.recv()
                    trio.from_thread.run_sync(server.disconnect, "kim")
                    try:
                        while True:
                            ws.recv(timeout=5)
                    except ConnectionClosed:
                        pass
                    return ws.close_code

            started = time.monotonic()
            assert await trio.to_thread.run_sync(client) == 1000
            assert time.monotonic() - started < 3
            nursery.cancel_scope.cancel()

    run(body)


def test_hook_queue_size_bounds_the_coroutine_hook_queue() -> None:
    release = trio.Event()

    async def on_event(event: Notification) -> None:
        await release.wait()

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConfigError):
                await start(nursery, hook_queue_size=0)
            server = await start(nursery, QUICK, on_event=on_event, hook_queue_size=2)
            client = await RawClient.connect(server.port)
            await client.recv_text()
            for i in range(10):
                await client.send_text(f"sub:t{i}")
            await wait_for(lambda: len(server.stats().topics) == 10)
            assert server.dropped_events == 11 - 1 - 2  # one being handled, two queued
            release.set()
            nursery.cancel_scope.cancel()

    run(body)


def test_wait_closed_returns_after_shutdown() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)
            order: list[str] = []

            async def waiter() -> None:
                await server.wait_closed()
                order.append("closed")

            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            assert order == []
            await server.shutdown()
            await trio.sleep(0.05)
            assert order == ["closed"]

    run(body)


def test_http_request_then_half_close_still_gets_its_answer() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            await stream.send_eof()  # FIN right behind the request (keep-alive not asked to end)
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            await stream.aclose()
            with trio.fail_after(5):
                while server._conns:  # the socket is closed after the answer went out
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    run(body)


def test_debug_logging_traces_frames_in_and_out(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK)
            client = await RawClient.connect(server.port, "/ws?user_id=dbg")
            await client.recv_text()
            await client.send_text("sub:news")
            with trio.fail_after(5):
                while server.stats().topics.get("news") != 1:
                    await trio.sleep(0.01)
            server.publish("news", "traced")
            await client.recv_text()
            await client.aclose()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.DEBUG, logger="tank.frames"):
        run(body)
    lines = [r.getMessage() for r in caplog.records if r.name == "tank.frames"]
    assert any("<- http GET /ws?user_id=dbg" in line for line in lines)
    assert any("-> http HTTP/1.1 101" in line for line in lines)
    assert any("-> text 'Hello, dbg!" in line for line in lines)
    assert any("<- text 'sub:news'" in line for line in lines)
    assert any("traced" in line and "->" in line for line in lines)
