"""The asyncio client: ``tank_core.client.session.ClientSession`` over asyncio transports.

A byte pump (DESIGN.md §1). Every decision (handshake, heartbeat, liveness, backoff, resubscribing,
the send queue, callbacks, streams, the poison rule) is the core's; this module opens and aborts
the connections the core asks for (one ``asyncio.Protocol`` each), reads into the core, writes
what the core has for a connection whenever its transport is not paused, runs **one** timer
(``loop.call_later``) armed for ``next_deadline()``, and starts a task per asynchronous callback.
docs/client.md is the contract, shared with tank_trio.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from tank_core.actions import OpenConnection
from tank_core.client.connect import ClientConnect
from tank_core.client.session import CallbackJob, ClientSession
from tank_core.client.streams import Flag, MessageStream
from tank_core.describe import describe_error

__all__ = ["Client", "MessageStream", "connect"]


class _Link(asyncio.Protocol):
    """One connection the core asked for; it reports to its client."""

    def __init__(self, client: Client, conn_id: int) -> None:
        self.client = client
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        #: The task opening it, while it runs.
        self.opening: asyncio.Task[None] | None = None
        #: Clear while the transport is paused (its buffer is above the high-water mark).
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.client._opened(self):
            self.transport.abort()  # an attempt the core gave up on

    def data_received(self, data: bytes) -> None:
        self.client._received(self, data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.client._gone(self, None if exc is None else describe_error(exc))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        self.client._output_ready(self)


class Client(ClientSession[_Link]):
    """A connected Tank client; get one from ``async with tank_asyncio.connect(...) as client``."""

    _loop: asyncio.AbstractEventLoop | None = None
    _timer: asyncio.TimerHandle | None = None
    #: The tasks of asynchronous callbacks (the loop holds tasks weakly).
    _tasks: set[asyncio.Task[None]]

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The one timer of this client (None while nothing is due); for tests."""
        return self._timer

    async def start(self) -> None:
        """Begin connecting (``connect`` calls it; then ``wait_open``)."""
        self._loop = asyncio.get_running_loop()
        self._tasks = set()
        self._begin()

    # ------------------------------------------------------------------ ClientSession's needs

    #: loop.time()'s clock at full resolution (uvloop's moves in 1 ms steps).
    _clock = staticmethod(time.monotonic)
    _wall = staticmethod(time.time)

    def _connect(self, action: OpenConnection) -> _Link:
        link = _Link(self, action.conn_id)
        assert self._loop is not None
        link.opening = self._loop.create_task(self._open(link, action), name="tank-connect")
        return link

    async def _open(self, link: _Link, action: OpenConnection) -> None:
        context = None
        if action.tls:
            context = self._ssl_context or ssl.create_default_context()
        assert self._loop is not None
        try:
            await self._loop.create_connection(
                lambda: link, action.host, action.port, ssl=context,
                server_hostname=action.host if context is not None else None,
            )
        except Exception as exc:  # refused, unreachable, TLS (a cancellation is an abort)
            self._gone(link, describe_error(exc))
        finally:
            link.opening = None

    def _disconnect(self, link: _Link) -> None:
        if link.opening is not None:
            link.opening.cancel()
        if link.transport is not None:
            link.transport.abort()

    def _output_ready(self, link: _Link) -> None:
        """Write what the core has for ``link`` while its transport takes it; close it when told."""
        transport = link.transport
        while transport is not None and link.writable.is_set() and not transport.is_closing():
            data = self._core.data_to_send(link.conn_id)
            if data is None:
                transport.close()  # after what it buffered; connection_lost reports it
            elif data:
                transport.write(data)
                continue
            return

    async def _room(self) -> None:
        link = self._current_link()
        if link is not None:
            await link.writable.wait()

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._loop is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_fired()

    def _spawn(self, job: CallbackJob) -> None:
        assert self._loop is not None
        task = self._loop.create_task(job.run(), name=job.name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        job.cancel = task.cancel

    def _flag(self) -> Flag:
        return asyncio.Event()

    async def _wait(self, flag: Flag, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await flag.wait()
        except TimeoutError:
            pass
        return flag.is_set()


class connect(ClientConnect[Client], client=Client):
    """``async with tank_asyncio.connect(url, ...) as client:`` (docs/client.md)."""

    @asynccontextmanager
    async def _session(self, client: Client) -> AsyncIterator[Client]:
        await client.start()
        try:
            await client.wait_open()
        except BaseException:
            await client.close()
            raise
        try:
            yield client
        finally:
            await client.close()
        if client.failure is not None:
            raise client.failure
