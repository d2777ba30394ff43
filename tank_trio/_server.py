"""The trio adapter: ``tank_core.ServerSession`` over plain non-blocking sockets, a byte pump.

Every socket (accepted, or opened on the core's word: Redis links) has a reader task and a writer
task. After a batch, one flusher task takes what the core has for each socket whose writer is idle
and sends it as one write; a send the kernel takes whole costs no task switch (a task wake-up per
recipient was most of a fan-out's cost). What the kernel does not take whole, a close, and a socket
whose writer is busy are the writer's. Either way one piece of code writes to a socket at a time.
One timer task sleeps in a ``CancelScope`` the session moves (DESIGN.md §2). All the rest (hooks,
verdicts, the poison rule, commands, log lines) is the session's. ``serve`` runs the tasks behind a
shield; a guard task outside it turns a cancellation of its scope into a graceful shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_readable, wait_task_rescheduled

from tank_core import ServerConfig, ServerSession
from tank_core.actions import AbortTransport, OpenConnection, PauseReading, ResumeReading
from tank_core.events import BytesReceived, ConnectionOpened, TransportClosed
from tank_core.server.hooks import HOOK_QUEUE_SIZE, Hook, SubscribeHook
from tank_core.server.session import HOOK_DRAIN_TIMEOUT, AuthHook

from ._connection import Connection, close_socket, describe, plain_socket, send_rest
from ._tls import serve_tls_connection

__all__ = ["Server", "serve", "serve_in"]

logger = logging.getLogger("tank")

#: accept() errors that mean "out of file descriptors or memory": wait and retry.
_CAPACITY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


class Server(ServerSession):
    """A running Tank server on trio (docs/embedding.md, "The server object"). Made by ``serve``."""

    _clock = staticmethod(trio.current_time)
    _wall = staticmethod(time.time)

    def __init__(
        self, config: ServerConfig | None, *, ssl: ssl.SSLContext | None = None, **hooks: Any
    ) -> None:
        super().__init__(config, **hooks)
        self.host, self.port = "", 0
        self._ssl = ssl  # wss:// when set (_tls.py)
        self._conns: dict[int, Connection] = {}  # until reported gone
        self._parked: dict[int, Task] = {}  # writers waiting for bytes, by connection id
        self._flusher: Task | None = None  # the flush task, while it waits for a batch
        self._opening: dict[int, trio.CancelScope] = {}  # OpenConnection still connecting
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery = None  # type: ignore[assignment]  # set by _start
        self._deadline, self._timer_scope = math.inf, trio.CancelScope()
        self._hooks_running, self._hooks_over, self._hooks_done = False, False, trio.Event()
        self._idle, self._stopped, self._shutdown_done = trio.Event(), trio.Event(), trio.Event()
        self._buffer = bytearray(65536)  # every reader's (one runs at a time)
        self._view = memoryview(self._buffer)

    @property
    def url(self) -> str:
        """``ws://host:port/path`` (``wss://`` with TLS) with the real port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "ws" if self._ssl is None else "wss"
        return f"{scheme}://{host}:{self.port}{self.config.path}"

    async def shutdown(self) -> None:
        """Graceful: ``Server is shutting down``, Close 1001, flush within ``close_timeout``, then
        abort; returns when every connection is gone and the listener is closed."""
        self._close_listeners()
        if not self._begin_shutdown():
            return await self._shutdown_done.wait()
        try:
            with trio.move_on_after(self._shutdown_grace):
                await self._all_gone()
            self._kill_all()
            with trio.move_on_after(HOOK_DRAIN_TIMEOUT):
                await self._all_gone()  # what the aborted sockets report reaches the hooks too
                while self._hooks_running:
                    await self._hooks_done.wait()
        finally:
            self._hooks_over = True
            self._drop_queued_hooks()
            self._shutdown_done.set()
            self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait until the server has stopped (after ``shutdown()``, a cancellation or a failure)."""
        await self._stopped.wait()

    async def _all_gone(self) -> None:
        while self._conns:
            self._idle = trio.Event()
            await self._idle.wait()

    async def _listen(self, host: str, port: int) -> None:
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = self._listeners[0].socket.getsockname()
        self.host, self.port = host or sockname[0], int(sockname[1])

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._timer, name="tank timer")
        nursery.start_soon(self._flush_loop, name="tank flusher")
        for listener in self._listeners:
            nursery.start_soon(self._accept_loop, listener, name="tank accept")
        self._start_core()

    def _started(self) -> bool:
        return self._nursery is not None

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.socket.close()

    def _kill_all(self) -> None:
        self._close_listeners()
        for scope in self._opening.values():
            scope.cancel()
        self._opening.clear()
        for conn in list(self._conns.values()):
            self._kill(conn)

    def _abort_all(self) -> None:
        self._kill_all()
        self._conns.clear()  # a failed core hears no more: nothing to wait for
        self._idle.set()
        self._stopped.set()

    # ------------------------------------------------------------------ what the session asks

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        conn = self._conns.get(action.conn_id)
        match action:
            case OpenConnection(conn_id=conn_id):
                scope = self._opening[conn_id] = trio.CancelScope()
                self._nursery.start_soon(self._connect, action, scope, name=f"tank reader {conn_id}")
            case AbortTransport(conn_id=conn_id):
                if conn is not None:
                    self._kill(conn)
                elif (opening := self._opening.pop(conn_id, None)) is not None:
                    opening.cancel()  # give up opening it
            case PauseReading() if conn is not None and conn.resume is None:
                conn.resume = trio.Event()
            case ResumeReading() if conn is not None and conn.resume is not None:
                conn.resume.set()
                conn.resume = None

    def _output_ready(self) -> None:
        # One wake-up per batch, not one per recipient: the flusher runs once everything queued in
        # this step of the loop is in, so publishes made together leave as one write per socket.
        task = self._flusher
        if task is not None:
            self._flusher = None
            reschedule(task)

    def _turn_wanted(self) -> None:
        self._output_ready()  # the flusher ends the turn after a checkpoint

    async def _flush_loop(self) -> None:
        """The fan-out hot path. For each socket the core names whose writer is parked (idle), take
        its bytes and send them here: a send the kernel takes whole costs no task switch. A partial
        send, a close or an EOF goes to that socket's writer, which finishes it; a socket whose
        writer is busy is left to it (it takes the rest when it next asks). So at any moment one
        piece of code writes to a socket, and its bytes go out in the core's order."""
        core, parked, get, me = self._core, self._parked, self._conns.get, current_task()
        take, pop = core.data_to_send, parked.pop

        def abort(_raise_cancel: object) -> Abort:
            self._flusher = None
            return Abort.SUCCEEDED

        while True:
            if not core.output_waiting and not core.turn_wanted:
                self._flusher = me
                await wait_task_rescheduled(abort)  # until _output_ready
            try:
                for conn_id in core.take_ready():
                    task = pop(conn_id, None)
                    if task is None:
                        continue
                    conn = get(conn_id)
                    if conn is not None and conn.tls is not None:
                        reschedule(task)  # TLS bytes go through its stream: its writer sends them
                        continue
                    data = None if conn is None or conn.dead or conn.eof else take(conn_id)
                    if data:
                        try:
                            sent = conn.sock.send(data)  # type: ignore[union-attr]
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            sent = -1  # the writer meets the error and reports it
                        if sent == len(data):
                            parked[conn_id] = task  # all written: it stays parked
                            continue
                        conn.pending = data[sent:] if sent > 0 else data  # type: ignore[union-attr]
                    elif data is not None:
                        parked[conn_id] = task  # nothing after all
                        continue
                    reschedule(task)  # to finish a write, or to close
            except Exception as exc:  # data_to_send failed: a bug in shared state
                self._fail(exc)
                return
            if core.turn_wanted:
                await trio.lowlevel.checkpoint()  # every other runnable task has its turn
                self._end_turn()

    def _arm(self, deadline: float | None) -> None:
        self._deadline = self._timer_scope.deadline = math.inf if deadline is None else deadline

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        self._nursery.start_soon(job)

    def _hooks_waiting(self) -> None:
        if self._hooks_over:
            self._drop_queued_hooks()
        elif not self._hooks_running:  # else the running task gets to them
            self._hooks_running, self._hooks_done = True, trio.Event()
            self._nursery.start_soon(self._hook_task, name="tank hooks")

    # ------------------------------------------------------------------ tasks

    async def _timer(self) -> None:
        """The one timer: asleep until the armed deadline; then the session's ``_timer_fired``."""
        while True:
            with trio.CancelScope(deadline=self._deadline) as self._timer_scope:
                await trio.sleep_forever()
            self._deadline = math.inf  # a timer that fired is disarmed
            self._timer_fired()

    async def _hook_task(self) -> None:
        try:
            await self._run_queued_hooks()  # until the queue is empty
        finally:
            self._hooks_running = False
            self._hooks_done.set()

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                logger.error("accept() failed (%s); retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            if self._ssl is not None:
                self._nursery.start_soon(serve_tls_connection, self, stream, self._ssl,
                                         self.config.request_timeout, name="tank tls")
                continue
            try:
                sock = plain_socket(stream)
                peer = sock.getpeername()
            except OSError:
                stream.socket.close()
                continue  # gone before we looked
            conn_id = self._accept(peer[0] if isinstance(peer, tuple) else str(peer))
            if conn_id is None:  # the server failed
                return close_socket(sock)
            self._nursery.start_soon(self._reader, self._attach(conn_id, sock), name=f"tank reader {conn_id}")

    async def _connect(self, action: OpenConnection, scope: trio.CancelScope) -> None:
        """``OpenConnection``: connect, then this task is the socket's reader, as for any other."""
        stream, error = None, ""
        with scope:
            try:
                stream = await trio.open_tcp_stream(action.host, action.port)
            except OSError as exc:
                error = describe(exc)
        conn_id, now, wall = action.conn_id, trio.current_time(), time.time()
        if self._opening.pop(conn_id, None) is None:  # given up (AbortTransport) meanwhile
            if stream is not None:
                stream.socket.close()
        elif stream is None:
            self._event(TransportClosed(conn_id=conn_id, now=now, wall_time=wall, error=error))
        else:
            conn = self._attach(conn_id, plain_socket(stream))
            self._event(ConnectionOpened(conn_id=conn_id, now=now, wall_time=wall))
            await self._reader(conn)

    def _attach(self, conn_id: int, sock: socket.socket) -> Connection:
        """Track a connected socket and start its writer (the caller runs its reader)."""
        conn = self._conns[conn_id] = Connection(conn_id, sock)
        self._nursery.start_soon(self._writer, conn, name=f"tank writer {conn_id}")
        return conn

    async def _reader(self, conn: Connection) -> None:
        conn_id, sock, event = conn.conn_id, conn.sock, self._event
        recv_into, buffer, view = sock.recv_into, self._buffer, self._view
        error = None
        try:
            while not conn.dead:
                if conn.resume is not None:
                    await conn.resume.wait()
                    continue
                await wait_readable(sock)  # also this task's checkpoint: a flood cannot starve others
                try:
                    size = recv_into(buffer)
                except BlockingIOError:
                    continue
                if not size:  # half-closed by the peer: the writer sends what is queued, then closes
                    conn.eof = True
                    return self._wake(conn_id)
                event(BytesReceived(conn_id=conn_id, data=view[:size].tobytes(),
                                    now=trio.current_time(), wall_time=time.time()))
        except trio.ClosedResourceError:
            pass  # we closed it
        except OSError as exc:
            error = None if conn.dead else describe(exc)  # a reset
        self._gone(conn, error)

    async def _writer(self, conn: Connection) -> None:
        """Writes to ``conn.sock`` whatever the flusher could not: the rest of a partial send, then
        everything the core has queued (control frames first) as one write, waiting for room as
        long as needed; closes when the core says so. Parks (idle) when there is nothing."""
        conn_id, sock, take, parked = conn.conn_id, conn.sock, self._core.data_to_send, self._parked
        send, me = sock.send, current_task()

        def abort(_raise_cancel: object) -> Abort:
            parked.pop(conn_id, None)
            return Abort.SUCCEEDED

        error = None
        try:
            while not conn.dead:
                data = conn.pending or take(conn_id)
                conn.pending = b""
                if self._core.turn_wanted:
                    self._turn_wanted()  # an HTTP answer taken lets its next requests go on
                if data:
                    try:
                        sent = send(data)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(data):
                        await send_rest(sock, data, sent)
                elif conn.eof:
                    break  # the peer closed (too) and nothing is left to write
                elif data is None:
                    # Linger: FIN after our last bytes (a Close frame, an error answer), then the
                    # reader reads on (the core ignores it) until the peer's FIN, so input we never
                    # read cannot turn our close into a reset. The core aborts it after close_timeout.
                    if not conn.lingering:
                        conn.lingering = True
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                        if conn.resume is not None:
                            conn.resume.set()
                            conn.resume = None
                    parked[conn_id] = me
                    await wait_task_rescheduled(abort)  # until the reader's EOF (or _kill)
                else:
                    parked[conn_id] = me
                    await wait_task_rescheduled(abort)  # until _output_ready (or _kill) wakes it
        except trio.ClosedResourceError:
            pass  # we closed it (AbortTransport)
        except OSError as exc:
            error = None if conn.dead else describe(exc)
        except Exception as exc:  # data_to_send failed: a bug in shared state
            self._fail(exc)
        self._gone(conn, error, write_failed=error is not None)

    def _wake(self, conn_id: int) -> None:
        task = self._parked.pop(conn_id, None)
        if task is not None:
            reschedule(task)

    def _kill(self, conn: Connection) -> None:
        """Drop the socket now, whatever is queued; both tasks of the connection leave."""
        if not conn.dead:
            conn.dead = True
            close_socket(conn.sock)  # wakes a pending read or write wait with ClosedResourceError
            if conn.resume is not None:
                conn.resume.set()
            self._wake(conn.conn_id)

    def _gone(self, conn: Connection, error: str | None = None, write_failed: bool = False) -> None:
        """The socket is closed, or failed: close it and tell the core, once."""
        self._kill(conn)
        if self._conns.pop(conn.conn_id, None) is not None:
            self._event(TransportClosed(conn_id=conn.conn_id, now=trio.current_time(),
                                        wall_time=time.time(), error=error, write_failed=write_failed))
            if not self._conns:
                self._idle.set()


async def serve(
    config: ServerConfig | None, host: str, port: int, *, authenticate: AuthHook | None = None,
    authorize_subscribe: SubscribeHook | None = None, on_connect: Hook | None = None,
    on_disconnect: Hook | None = None, on_message: Hook | None = None, on_error: Hook | None = None,
    on_event: Hook | None = None, hook_queue_size: int = HOOK_QUEUE_SIZE, redis_url: str | None = None,
    ssl: ssl.SSLContext | None = None, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Tank on ``host:port`` (0 picks a free port) until shut down: ``server = await
    nursery.start(tank_trio.serve, config, host, port)`` (hooks through ``functools.partial``, or
    ``serve_in``). Returns after ``await server.shutdown()``; cancelling the scope that runs it shuts
    down gracefully, then lets the cancellation through. Re-raises what stopped the server.
    ``redis_url="redis://HOST:PORT/DB"`` makes it one node of a cluster (docs/scale-out.md);
    ``ssl=`` (a server-side ``ssl.SSLContext``) serves ``wss://`` and the HTTP API over HTTPS."""
    server = Server(config, authenticate=authenticate, authorize_subscribe=authorize_subscribe,
                    on_connect=on_connect, on_disconnect=on_disconnect, on_message=on_message,
                    on_error=on_error, on_event=on_event, hook_queue_size=hook_queue_size,
                    redis_url=redis_url, ssl=ssl)
    await server._listen(host, port)
    from_outside = False

    async def shutdown_when_cancelled() -> None:
        """Outside the shield: the scope running serve() is cancelled -> graceful shutdown."""
        nonlocal from_outside
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            if not server.closing:
                from_outside = True
                with trio.CancelScope(shield=True):
                    await server.shutdown()
            raise

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(shutdown_when_cancelled, name="tank shutdown guard")
            with trio.CancelScope(shield=True):  # a cancelled caller still gets a graceful shutdown
                async with trio.open_nursery() as nursery:
                    server._start(nursery)
                    task_status.started(server)
                    await server._stopped.wait()
                    nursery.cancel_scope.cancel()
            if not from_outside:
                outer.cancel_scope.cancel()
    finally:
        server._kill_all()
    if server.failure is not None:
        raise server.failure


async def serve_in(
    nursery: trio.Nursery, config: ServerConfig | None, host: str, port: int, **hooks: Any
) -> Server:
    """Start ``serve`` in ``nursery`` with keyword hooks; returns the listening ``Server``."""
    server: Server = await nursery.start(functools.partial(serve, config, host, port, **hooks))
    return server
