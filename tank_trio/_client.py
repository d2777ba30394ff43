"""The trio client: ``tank_core.client.session.ClientSession`` over trio streams.

A byte pump (DESIGN.md §1). Every decision (handshake, heartbeat, liveness, backoff, resubscribing,
the send queue, callbacks, streams, the poison rule) is the core's; this module opens and aborts
the connections the core asks for, pumps their bytes, runs one timer and starts the tasks of
asynchronous callbacks. docs/client.md is the contract, shared with tank_asyncio.

``async with tank_trio.connect(url, ...) as client:`` opens the client's own nursery. In it:

- one **link task** per connection (``trio.open_tcp_stream`` / ``trio.open_ssl_over_tcp_stream``):
  it is the connection's **writer**, the only caller of ``send_all``, taking what the core has
  for it each time it is woken (``core.data_to_send``), and runs its **reader**;
- the **timer** task, asleep in a ``CancelScope`` whose deadline is ``core.next_deadline()``;
- the **callback starter**, which starts each asynchronous callback as a task, in call order.

These tasks run behind their own shielded cancel scopes: a cancellation of the block still gets the
closing handshake (``close()``, bounded by ``close_timeout``), then they are cancelled and the
cancellation goes on. Core calls are synchronous, so carrying out their actions never awaits.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from tank_core.actions import OpenConnection
from tank_core.client.connect import ClientConnect
from tank_core.client.session import CallbackJob, ClientSession
from tank_core.client.streams import Flag, MessageStream
from tank_core.describe import describe_error

__all__ = ["Client", "MessageStream", "connect"]

#: ``send()`` waits while more than this many bytes wait in the core for the writer (asyncio's
#: default transport high-water mark).
WRITE_HIGH_WATER = 65536
_RECEIVE_SIZE = 65536


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the error behind ``exc``: trio wraps socket and TLS errors (a
    ``BrokenResourceError`` caused by an ``SSLError``; ``open_tcp_stream``'s ``OSError`` caused by
    a group of one error per address tried)."""
    cause = exc.__cause__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    elif isinstance(cause, BaseExceptionGroup) and type(exc) is OSError:
        leaves = cause.exceptions
        if len(leaves) == 1 or all(str(leaf) == str(leaves[0]) for leaf in leaves):
            exc = leaves[0]
    return describe_error(exc)


class _Link:
    """One connection the core asked for: the scope that ends it, its writer's wake-up call."""

    __slots__ = ("conn_id", "error", "scope", "wakeup")

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        #: Shielded: only the client ends a link (abort, teardown), never an outer cancellation.
        self.scope = trio.CancelScope(shield=True)
        #: Set when the core has output for the link and its writer waits.
        self.wakeup: trio.Event | None = None
        #: Why the link ended (None: EOF, or our own close).
        self.error: str | None = None


class Client(ClientSession[_Link]):
    """A connected Tank client; get one from ``async with tank_trio.connect(...) as client``."""

    _nursery: trio.Nursery | None = None
    _timer_at = math.inf
    _timer_scope: trio.CancelScope | None = None
    #: Set for ``send()`` callers when the writer took the core's output.
    _taken: trio.Event | None = None
    #: The shielded scopes of the timer and the callback starter (cancelled on teardown).
    _service_scopes: list[trio.CancelScope]
    #: Callback jobs for the callback starter.
    _jobs_in: trio.MemorySendChannel[CallbackJob]
    _jobs_out: trio.MemoryReceiveChannel[CallbackJob]

    @property
    def timer(self) -> trio.CancelScope | None:
        """The scope the one timer task sleeps in, while something is due (None otherwise); its
        ``deadline`` is ``core.next_deadline()``. For tests."""
        scope = self._timer_scope
        return None if scope is None or scope.deadline == math.inf else scope

    async def _start(self, nursery: trio.Nursery) -> None:
        """Begin connecting in ``nursery`` (``connect`` calls it; then ``wait_open``)."""
        self._nursery = nursery
        self._service_scopes = []
        self._jobs_in, self._jobs_out = trio.open_memory_channel[CallbackJob](math.inf)
        await nursery.start(self._run_timer, name="tank client timer")
        await nursery.start(self._run_jobs, name="tank client callbacks")
        self._begin()

    def _teardown(self) -> None:
        """Leaving the block: end every task of the client (after ``close()``)."""
        self._stop_callbacks()
        for link in self._links.values():
            link.scope.cancel()
        for scope in self._service_scopes:
            scope.cancel()
        self._jobs_in.close()

    # ------------------------------------------------------------------ ClientSession's needs

    def _connect(self, action: OpenConnection) -> _Link:
        link = _Link(action.conn_id)
        assert self._nursery is not None
        name = f"tank client writer {action.host}:{action.port}"
        self._nursery.start_soon(self._run_link, link, action, name=name)
        return link

    def _disconnect(self, link: _Link) -> None:
        link.scope.cancel()

    def _output_ready(self, link: _Link) -> None:
        if link.wakeup is not None:
            link.wakeup.set()
            link.wakeup = None

    async def _open_stream(self, action: OpenConnection) -> trio.abc.Stream:
        if not action.tls:
            return await trio.open_tcp_stream(action.host, action.port)
        context = self._ssl_context or ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(action.host, action.port, ssl_context=context)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _run_link(self, link: _Link, action: OpenConnection) -> None:
        """One connection: open it, then write (and read) until it ends; report the end unless
        the core dropped it."""
        with link.scope:
            try:
                stream = await self._open_stream(action)
            except Exception as exc:  # refused, unreachable, TLS: the attempt failed
                link.error = _describe(exc)
            else:
                try:
                    if self._opened(link):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._reader, link, stream, nursery.cancel_scope,
                                               name="tank client reader")
                            await self._writer(link, stream)
                            nursery.cancel_scope.cancel()
                finally:
                    await trio.aclose_forcefully(stream)
        self._wake_senders()
        self._gone(link, link.error)

    async def _reader(self, link: _Link, stream: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while data := await stream.receive_some(_RECEIVE_SIZE):
                self._received(link, bytes(data))
        except Exception as exc:  # reset, TLS error, or we closed it
            link.error = link.error or _describe(exc)
        done.cancel()

    async def _writer(self, link: _Link, stream: trio.abc.Stream) -> None:
        """The only code that writes to ``stream``; returns once the core closed the link (after
        its last frames) or a write failed."""
        try:
            while True:
                data = self._core.data_to_send(link.conn_id)
                self._wake_senders()
                if data is None:
                    await stream.aclose()  # (TLS: close_notify)
                    return
                if data:
                    await stream.send_all(data)
                else:
                    link.wakeup = trio.Event()
                    await link.wakeup.wait()
        except Exception as exc:  # reset, broken pipe, TLS error...
            link.error = _describe(exc)

    async def _room(self) -> None:
        if self._core.buffered <= WRITE_HIGH_WATER:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while self._core.buffered > WRITE_HIGH_WATER:
            taken = self._taken = self._taken or trio.Event()
            await taken.wait()

    def _wake_senders(self) -> None:
        if self._taken is not None:
            self._taken.set()
            self._taken = None

    _clock = staticmethod(trio.current_time)
    _wall = staticmethod(time.time)

    def _arm(self, deadline: float | None) -> None:
        self._timer_at = math.inf if deadline is None else deadline
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._timer_at

    async def _run_timer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one timer of the client: sleeps until the armed deadline, then ``_timer_fired``."""
        with trio.CancelScope(shield=True) as outer:
            self._service_scopes.append(outer)
            task_status.started()
            while True:
                with trio.CancelScope(deadline=self._timer_at) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                self._timer_at = math.inf
                self._timer_fired()

    def _spawn(self, job: CallbackJob) -> None:
        try:
            self._jobs_in.send_nowait(job)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            job.discard()  # the client is gone

    async def _run_jobs(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Starts each callback job as its own task, one after the other (so in call order)."""
        nursery = self._nursery
        assert nursery is not None
        with trio.CancelScope(shield=True) as scope:
            self._service_scopes.append(scope)
            task_status.started()
            async for job in self._jobs_out:
                if not job.done:
                    await nursery.start(self._run_job, job, name=job.name)

    async def _run_job(
        self, job: CallbackJob, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope(shield=True) as scope:  # cancelled by close() after CALLBACK_GRACE
            job.cancel = scope.cancel
            task_status.started()
            await job.run()

    def _flag(self) -> Flag:
        return trio.Event()

    async def _wait(self, flag: Flag, timeout: float | None) -> bool:
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await flag.wait()
        return flag.is_set()

    async def _checkpoint_in(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()

    async def _checkpoint_out(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()


class connect(ClientConnect[Client], client=Client):
    """``async with tank_trio.connect(url, ...) as client:`` (docs/client.md), in a nursery of
    its own: a cancellation of the block still gets the closing handshake, then goes on."""

    @asynccontextmanager
    async def _session(self, client: Client) -> AsyncIterator[Client]:
        # Exceptions of the body (and of entering) are held while the nursery closes and raised
        # after it, unchanged: never wrapped in an ExceptionGroup. The client's tasks never raise.
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await client._start(nursery)
                await client.wait_open()
            except BaseException as exc:
                error = exc
            if error is None:
                try:
                    yield client
                except BaseException as exc:
                    error = exc
            try:
                with trio.CancelScope(shield=True):
                    await client.close()
            except BaseException as exc:  # a failure of the core while closing
                error = error or exc
            finally:
                client._teardown()
        if error is not None:
            try:
                raise error
            finally:
                error = None  # no reference cycle through the traceback
        if client.failure is not None:
            raise client.failure
