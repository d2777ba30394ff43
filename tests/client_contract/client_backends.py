"""One small adapter per client backend, so that a single async test body runs on asyncio and trio.

``Backend.run(body)`` runs ``await body(backend)`` on a fresh loop of that backend (bounded by
``timeout``); inside it the body uses ``backend.connect`` (``tank_asyncio.connect`` or
``tank_trio.connect``), a real in-process server of the same backend (``start_server`` /
``stop_server``; servers still running when the body returns are stopped), and the backend's
primitives: ``sleep``, ``now``, ``wait_for``, ``event``, ``start_soon``, ``to_thread``. The few
checks that look at a backend's internals (its timer, its tasks) are ``assert_*`` methods here.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

import tank_asyncio
import tank_trio
from tank_core import ServerConfig

Body = Callable[["Backend"], Awaitable[None]]


class Event(Protocol):
    def set(self) -> None: ...

    async def wait(self) -> Any: ...


class Backend:
    """What a shared client test needs from its backend."""

    name: str
    connect: Callable[..., Any]
    #: extra ``tank serve`` arguments that pick this backend's server
    cli_args: tuple[str, ...]

    def run(self, body: Body, timeout: float = 20.0) -> None:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    async def wait_for(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """``await awaitable``, raising ``TimeoutError`` after ``timeout`` seconds."""
        raise NotImplementedError

    def event(self) -> Event:
        raise NotImplementedError

    def start_soon(self, fn: Callable[[], Awaitable[Any]]) -> None:
        raise NotImplementedError

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def start_server(self, config: ServerConfig, port: int = 0, **hooks: Any) -> Any:
        raise NotImplementedError

    async def stop_server(self, server: Any) -> None:
        raise NotImplementedError

    async def start_tls_proxy(self, upstream_port: int, context: ssl.SSLContext) -> int:
        """A TLS-terminating TCP proxy on 127.0.0.1 in front of ``upstream_port``: its port."""
        raise NotImplementedError

    def assert_timer_armed(self, client: Any) -> None:
        """The client's one timer is armed at the core's next deadline."""
        raise NotImplementedError

    def assert_tasks_while_open(self, client: Any) -> None:
        """The client runs the tasks its backend promises while a connection is open."""

    def assert_no_tasks_left(self) -> None:
        """Every task of a closed client has ended."""

    async def eventually(self, check: Callable[[], bool], timeout: float = 5.0,
                         step: float = 0.01) -> None:
        """Wait until ``check()`` is true, or fail after ``timeout`` seconds."""
        deadline = self.now() + timeout
        while not check():
            if self.now() > deadline:
                raise AssertionError("condition not reached in time")
            await self.sleep(step)

    def __repr__(self) -> str:
        return self.name


class AsyncioBackend(Backend):
    name = "asyncio"
    connect = staticmethod(tank_asyncio.connect)
    cli_args = ("--backend", "asyncio")

    def __init__(self) -> None:
        self._servers: dict[int, tank_asyncio.serve] = {}
        self._background: list[asyncio.Task[Any]] = []
        self._proxies: list[asyncio.Server] = []

    def run(self, body: Body, timeout: float = 20.0) -> None:
        async def main() -> None:
            try:
                await body(self)
                for task in self._background:
                    await task
            finally:
                for task in self._background:
                    task.cancel()
                for proxy in self._proxies:
                    proxy.close()
                    await proxy.wait_closed()
                for cm in list(self._servers.values())[::-1]:
                    await cm.__aexit__(None, None, None)
                self._servers.clear()
                self._background.clear()
                self._proxies.clear()

        asyncio.run(asyncio.wait_for(main(), timeout))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def wait_for(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        return await asyncio.wait_for(awaitable, timeout)

    def event(self) -> Event:
        return asyncio.Event()

    def start_soon(self, fn: Callable[[], Awaitable[Any]]) -> None:
        async def call() -> None:
            await fn()

        self._background.append(asyncio.get_running_loop().create_task(call()))

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def start_server(self, config: ServerConfig, port: int = 0, **hooks: Any) -> Any:
        cm = tank_asyncio.serve(config, "127.0.0.1", port, **hooks)
        server = await cm.__aenter__()
        self._servers[id(server)] = cm
        return server

    async def stop_server(self, server: Any) -> None:
        await self._servers.pop(id(server)).__aexit__(None, None, None)

    async def start_tls_proxy(self, upstream_port: int, context: ssl.SSLContext) -> int:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        proxy = await asyncio.start_server(terminate, "127.0.0.1", 0, ssl=context)

        self._proxies.append(proxy)
        return int(proxy.sockets[0].getsockname()[1])

    def assert_timer_armed(self, client: Any) -> None:
        deadline = client.core.next_deadline()
        assert deadline is not None and client.timer is not None
        # armed at (or a millisecond of slack after) the core's deadline, never before
        assert deadline <= client.timer.when() <= deadline + 0.01


class TrioBackend(Backend):
    name = "trio"
    connect = staticmethod(tank_trio.connect)
    cli_args = ("--backend", "trio")

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._background: trio.Nursery | None = None

    def run(self, body: Body, timeout: float = 20.0) -> None:
        async def main() -> None:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as servers:
                    self._nursery = servers
                    async with trio.open_nursery() as background:
                        self._background = background
                        await body(self)
                    servers.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseExceptionGroup as group:  # a lone failure of the body: the failure itself
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if exc is group:
                raise
            raise exc from None
        finally:
            self._nursery = self._background = None

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def now(self) -> float:
        return trio.current_time()

    async def wait_for(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        with trio.fail_after(timeout):
            return await awaitable

    def event(self) -> Event:
        return trio.Event()

    def start_soon(self, fn: Callable[[], Awaitable[Any]]) -> None:
        assert self._background is not None
        self._background.start_soon(fn)

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def start_server(self, config: ServerConfig, port: int = 0, **hooks: Any) -> Any:
        assert self._nursery is not None
        return await tank_trio.serve_in(self._nursery, config, "127.0.0.1", port, **hooks)

    async def stop_server(self, server: Any) -> None:
        await server.shutdown()

    async def start_tls_proxy(self, upstream_port: int, context: ssl.SSLContext) -> int:
        async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(sink)

        async def terminate(tls: trio.SSLStream[trio.SocketStream]) -> None:
            upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
            async with trio.open_nursery() as pipes:
                pipes.start_soon(pipe, tls, upstream)
                pipes.start_soon(pipe, upstream, tls)

        assert self._nursery is not None
        listeners = await self._nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, terminate, 0, context, host="127.0.0.1")
        )
        return int(listeners[0].transport_listener.socket.getsockname()[1])

    def assert_timer_armed(self, client: Any) -> None:
        assert client.timer is not None
        assert client.timer.deadline == client.core.next_deadline()

    def assert_tasks_while_open(self, client: Any) -> None:
        # One timer task; one writer (the connection's task) and one reader.
        assert count_tasks("tank client timer") == 1
        assert count_tasks("tank client writer") == 1
        assert count_tasks("tank client reader") == 1

    def assert_no_tasks_left(self) -> None:
        assert count_tasks("tank client") == 0


def count_tasks(name_part: str | None = None) -> int:
    """Tasks currently alive in the whole trio run (optionally only those whose name contains
    ``name_part``), walked from the root task through every nursery."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    total = 0
    stack = [root]
    while stack:
        task = stack.pop()
        if name_part is None or name_part in task.name:
            total += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return total


BACKENDS: dict[str, type[Backend]] = {"asyncio": AsyncioBackend, "trio": TrioBackend}
