"""Stopping a trio server: a cancelled scope and ``await server.shutdown()`` are both graceful
(PROTOCOL.md: pending output, then ``Server is shutting down``, then Close 1001), bounded by
``close_timeout``; a failing core aborts every socket and ``serve`` re-raises."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from trio_helpers import FAST, RawClient, run
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import tank_core
import tank_trio
from tank_core import ClientConnected, ClientDisconnected, LocalProtocolError, ServerConfig

SHUTDOWN_TEXT = "Server is shutting down"


class Served:
    """Runs ``serve`` in its own cancel scope inside ``nursery`` so a test can cancel just it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.server: tank_trio.Server | None = None
        self.exited = trio.Event()
        self.returned_normally = False

    async def run(
        self,
        config: ServerConfig | None,
        hooks: dict[str, Any],
        *,
        task_status: trio.TaskStatus[tank_trio.Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self.server = await tank_trio.serve_in(nursery, config, "127.0.0.1", 0, **hooks)
                    task_status.started(self.server)
                self.returned_normally = True
        finally:
            self.exited.set()


def listen_until_closed(url: str, connected: Any) -> tuple[list[str], int | None, str | None]:
    """websockets client (in a thread): every message until the close, and the close code."""
    messages: list[str] = []
    with connect(url) as ws:
        trio.from_thread.run_sync(connected)
        try:
            while True:
                message = ws.recv(timeout=10)
                assert isinstance(message, str)
                messages.append(message)
        except ConnectionClosed:
            pass
        return messages, ws.close_code, ws.close_reason


def graceful_stop(stop: str) -> tuple[list[list[str]], list[int | None], float, Served, list[Any]]:
    served = Served()
    disconnects: list[ClientDisconnected] = []
    results: list[tuple[list[str], int | None, str | None]] = []
    elapsed = 0.0

    async def body() -> None:
        nonlocal elapsed
        async with trio.open_nursery() as nursery:
            connected = trio.Semaphore(0)
            server = await nursery.start(served.run, FAST, {"on_disconnect": disconnects.append})

            async def client() -> None:
                results.append(
                    await trio.to_thread.run_sync(listen_until_closed, server.url, connected.release)
                )

            for _ in range(3):
                nursery.start_soon(client)
            for _ in range(3):
                await connected.acquire()
            await trio.sleep(0.05)
            assert server.broadcast("before") == 3
            assert server.broadcast("the end") == 3
            started = trio.current_time()
            if stop == "cancel":
                served.scope.cancel()
                await served.exited.wait()
            else:
                await server.shutdown()
                await served.exited.wait()
            elapsed = trio.current_time() - started

    run(body)
    return (
        [r[0] for r in results],
        [r[1] for r in results],
        elapsed,
        served,
        disconnects,
    )


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
def test_graceful_stop_flushes_then_says_goodbye_then_1001(stop: str) -> None:
    messages, codes, elapsed, served, disconnects = graceful_stop(stop)
    for received in messages:
        assert received[0].startswith("Hello, ")
        texts = [m for m in received[1:] if m != "heartbeat"]
        assert texts == ["before", "the end", SHUTDOWN_TEXT]
    assert codes == [1001, 1001, 1001]
    assert elapsed < FAST.close_timeout  # every client answered our Close: no waiting
    assert len(disconnects) == 3 and {d.code for d in disconnects} == {1001}
    if stop == "cancel":
        assert served.scope.cancelled_caught  # serve() let the cancellation through
        assert not served.returned_normally
    else:
        assert served.returned_normally  # serve() returned after shutdown()
        assert not served.scope.cancelled_caught
    assert served.server is not None
    with pytest.raises(LocalProtocolError):
        served.server.publish("t", "late")


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
def test_shutdown_is_bounded_by_close_timeout_when_peers_do_not_answer(stop: str) -> None:
    config = ServerConfig(heartbeat_interval=5, heartbeat_timeout=15, close_timeout=0.4)
    served = Served()
    elapsed = 0.0

    async def body() -> None:
        nonlocal elapsed
        async with trio.open_nursery() as nursery:
            server = await nursery.start(served.run, config, {})
            mute = [await RawClient.connect(server.port) for _ in range(3)]
            for client in mute:
                await client.recv_text()  # then never read nor answer again
            started = trio.current_time()
            if stop == "cancel":
                served.scope.cancel()
            else:
                await server.shutdown()
            await served.exited.wait()
            elapsed = trio.current_time() - started
            # The peers were dropped: after the goodbye, the Close, and EOF.
            for client in mute:
                close = await client.recv_until_close()
                assert close.code == 1001
                assert client.messages[-1] == SHUTDOWN_TEXT
                with pytest.raises(EOFError):
                    await client.next_event()

    run(body)
    assert config.close_timeout <= elapsed < config.close_timeout + 1.0


def test_cancelled_caller_sees_cancellation_not_a_group() -> None:
    async def body() -> None:
        with trio.move_on_after(0.3) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(tank_trio.serve, None, "127.0.0.1", 0)
        assert scope.cancelled_caught

    run(body)


def test_a_failing_core_aborts_every_socket_and_serve_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    class CoreBug(Exception):
        pass

    real_tick = tank_core.TankServer.tick
    calls = 0

    def tick(self: tank_core.TankServer, now: float, *, wall_time: float) -> list[Any]:
        nonlocal calls
        calls += 1
        if self.engine.connection_count:
            raise CoreBug("a bug in shared state")
        return real_tick(self, now, wall_time=wall_time)

    monkeypatch.setattr(tank_core.TankServer, "tick", tick)
    server_box: list[tank_trio.Server] = []
    failures: list[BaseException] = []

    async def body() -> None:
        async def run_server(task_status: trio.TaskStatus[tank_trio.Server]) -> None:
            try:
                await tank_trio.serve(FAST, "127.0.0.1", 0, task_status=task_status)
            except CoreBug as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_server)
            server_box.append(server)
            client = await RawClient.connect(server.port)
            await client.recv_text()
            with trio.fail_after(5), pytest.raises(EOFError):
                while True:
                    await client.next_event()  # aborted: EOF, no Close frame

    run(body)
    assert len(failures) == 1 and isinstance(failures[0], CoreBug)
    with pytest.raises(LocalProtocolError) as info:
        server_box[0].publish("t", "x")
    assert isinstance(info.value.__cause__, CoreBug)


def test_new_connections_are_refused_once_shutdown_began() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await tank_trio.serve_in(nursery, FAST, "127.0.0.1", 0)
            port = server.port
            await server.shutdown()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)

    run(body)


def test_shutdown_waits_for_async_hooks_to_see_the_disconnects() -> None:
    seen: list[str] = []

    async def on_event(event: Any) -> None:
        await trio.sleep(0.01)
        seen.append(type(event).__name__)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await tank_trio.serve_in(nursery, FAST, "127.0.0.1", 0, on_event=on_event)
            client = await RawClient.connect(server.port)
            await client.recv_text()

            async def answer() -> None:
                close = await client.recv_until_close()
                await client.send_close(close.code or 1000)

            nursery.start_soon(answer)
            while "ClientConnected" not in seen:
                await trio.sleep(0.01)
            started = time.monotonic()
            await server.shutdown()
            assert time.monotonic() - started < 1.0

    run(body)
    assert seen == [ClientConnected.__name__, ClientDisconnected.__name__]
