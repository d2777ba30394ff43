"""The asyncio adapter: ``tank_core.ServerSession`` over ``loop.create_server``, a byte pump.

A listener, one ``TankProtocol`` per socket (its reader; a cluster node's Redis links too), one writer
(``_flush_ready``), one timer; hooks, verdicts, the poison rule and the commands are the session's.
The sockets the session names are written at the end of the loop iteration, one ``data_to_send`` and
one ``write`` each, so what several batches queue leaves in one write (DESIGN.md §3); a paused
transport (``pause_writing``) is not taken from until ``resume_writing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from tank_core import LocalProtocolError, ServerConfig, ServerSession
from tank_core.actions import AbortTransport, OpenConnection, PauseReading, ResumeReading
from tank_core.events import ConnectionOpened, TransportClosed
from tank_core.server.hooks import HOOK_QUEUE_SIZE, Hook, SubscribeHook
from tank_core.server.session import HOOK_DRAIN_TIMEOUT, AuthHook

from . import _clock
from ._protocol import TankProtocol

__all__ = ["Server", "serve"]

#: Above this many bytes in a transport's buffer, output stays (counted) in the core: slow consumers.
WRITE_HIGH_WATER = 64 * 1024
#: Bytes taken from the core per write when a paused transport becomes writable again.
DRAIN_CHUNK = 64 * 1024
#: Listen backlog: reconnect storms (tank-websocket.js retries every second) arrive at once.
BACKLOG = 4096


class Server(ServerSession):
    """A running Tank server on asyncio; get one from ``async with serve(...) as server``."""

    _clock = staticmethod(_clock.now)
    _wall = staticmethod(time.time)

    def __init__(
        self, config: ServerConfig | None, host: str, port: int, *,
        ssl: ssl.SSLContext | None = None, **hooks: object,
    ) -> None:
        super().__init__(config, **hooks)  # type: ignore[arg-type]  # serve() types them
        self.host, self.port = host, port
        self._ssl = ssl  # wss:// (and HTTPS for the API) when set
        self._conns: dict[int, TankProtocol] = {}  # open sockets by the core's id (Redis too)
        self._opening: dict[int, asyncio.Task[None]] = {}  # OpenConnection not done yet
        self._flush_due = self._turn_due = self._serving = self._stopped = self._hooks_over = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        self._listener: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # verdicts awaiting the application
        self._hook_wake = asyncio.Event()
        self._hook_worker: asyncio.Task[None] | None = None
        self._all_gone, self._closed = asyncio.Event(), asyncio.Event()
        self._finisher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``ws://host:port/path`` (``wss://`` with TLS) with the real port."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        scheme = "ws" if self._ssl is None else "wss"
        return f"{scheme}://{host}:{self.port}{self.config.path}"

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The one timer of this server (None while nothing is due)."""
        return self._timer

    async def start(self) -> None:
        if self._loop is not None:
            raise LocalProtocolError("this server was already started")
        self._loop = asyncio.get_running_loop()
        # With TLS the core hears of a socket once its handshake succeeded (connection_made),
        # within request_timeout: a failed or stalled handshake costs nothing lasting.
        tls = {} if self._ssl is None else {
            "ssl": self._ssl, "ssl_handshake_timeout": self.config.request_timeout
        }
        self._listener = await self._loop.create_server(
            lambda: TankProtocol(self), self.host, self.port, backlog=BACKLOG, start_serving=False,
            **tls,
        )
        if self._listener.sockets:
            self.port = self._listener.sockets[0].getsockname()[1]
        self._serving = True
        self._start_core()
        await self._listener.start_serving()

    def _started(self) -> bool:
        return self._serving

    async def shutdown(self) -> None:
        """Graceful: ``Server is shutting down``, Close 1001, flush within ``close_timeout``, then
        abort; returns when every connection is gone and the listener is closed."""
        if self._serving:
            if self._finisher is None:
                self._finisher = self._loop.create_task(self._finish(), name="tank-shutdown")
            await self._closed.wait()

    async def wait_closed(self) -> None:
        """Wait until the server has shut down (or failed)."""
        if self._serving:
            await self._closed.wait()

    async def _finish(self) -> None:
        assert self._listener is not None
        self._listener.close()
        self._begin_shutdown()
        self._check_gone()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_gone.wait(), self._shutdown_grace)
        self._stopped = True
        self._arm(None)
        self._abort_all()  # what is left
        await asyncio.sleep(0)  # what the aborts report reaches the hooks
        for task in list(self._tasks):
            task.cancel()
        self._hooks_over = True
        if self._hook_worker is not None:
            self._hook_wake.set()  # the worker returns once the queue is empty
            await asyncio.wait({self._hook_worker}, timeout=HOOK_DRAIN_TIMEOUT)
        self._drop_queued_hooks()
        self._closed.set()

    def _check_gone(self) -> None:
        if self.closing and not self._conns and not self._opening:
            self._all_gone.set()

    # ------------------------------------------------------------------ sockets -> session

    def _connection_made(self, conn: TankProtocol, transport: asyncio.Transport) -> None:
        conn.transport = transport
        if conn.accepted:
            peer = transport.get_extra_info("peername")
            peer_host = peer[0] if isinstance(peer, tuple) and peer else str(peer or "")
            conn_id = None if self.closing else self._accept(peer_host)
            if conn_id is None:  # shutting down or failed
                return self._end(conn, abort=True)
            conn.conn_id = conn_id
        elif self._opening.pop(conn.conn_id, None) is None:
            return self._end(conn, abort=True)  # the core gave up on this connection meanwhile
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        conn.writable = True
        self._conns[conn.conn_id] = conn
        if not conn.accepted:
            self._event(ConnectionOpened(conn_id=conn.conn_id, now=_clock.now(), wall_time=time.time()))

    def _connection_lost(self, conn: TankProtocol, exc: Exception | None) -> None:
        conn.gone, conn.writable = True, False
        if self._conns.pop(conn.conn_id, None) is not None:
            self._closed_event(conn.conn_id, exc)
            self._check_gone()

    async def _open(self, action: OpenConnection) -> None:
        conn_id = action.conn_id
        try:
            await self._loop.create_connection(
                lambda: TankProtocol(self, conn_id), action.host, action.port,
                ssl=ssl.create_default_context() if action.tls else None,
            )
        except Exception as exc:  # OSError mostly: refused, unreachable, unknown host
            if self._opening.pop(conn_id, None) is not None:
                self._closed_event(conn_id, exc)
        finally:
            self._check_gone()

    def _closed_event(self, conn_id: int, exc: Exception | None) -> None:
        error = None if exc is None else str(exc) or type(exc).__name__
        self._event(TransportClosed(conn_id=conn_id, now=_clock.now(), wall_time=time.time(),
                                    error=error))

    # ------------------------------------------------------------------ session -> sockets

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        conn_id = action.conn_id
        if isinstance(action, OpenConnection):
            self._opening[conn_id] = self._loop.create_task(self._open(action), name=f"tank {conn_id}")
        elif (conn := self._conns.get(conn_id)) is None:
            if isinstance(action, AbortTransport) and conn_id in self._opening:
                self._opening.pop(conn_id).cancel()  # give up opening it
        elif isinstance(action, AbortTransport):
            self._end(conn, abort=True)
        elif not conn.gone and conn.transport is not None:
            if isinstance(action, PauseReading):
                conn.transport.pause_reading()
            else:
                conn.transport.resume_reading()

    def _output_ready(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_ready)

    def _flush_ready(self) -> None:
        """End of the loop iteration: one write per listed socket for everything queued."""
        self._flush_due = False
        take, get = self._core.data_to_send, self._conns.get
        try:
            ready = self._core.take_ready()
            while ready and self.failure is None:
                for conn_id in ready:  # each listed once; one pull takes it all
                    conn = get(conn_id)
                    if conn is None or not conn.writable:
                        continue  # not open yet, paused (taken on resume_writing), or gone
                    data = take(conn_id)
                    if data:
                        conn.transport.write(data)  # type: ignore[union-attr]
                    elif data is None:
                        self._end(conn)
                ready = self._core.take_ready()  # closes listed again (after their last bytes)
        except Exception as exc:  # a bug of ours
            self._fail(exc)
        if self._core.turn_wanted:
            self._turn_wanted()

    def _turn_wanted(self) -> None:
        if not self._turn_due:
            self._turn_due = True
            self._loop.call_soon(self._next_turn)  # after this iteration's other callbacks

    def _next_turn(self) -> None:
        self._turn_due = False
        self._end_turn()

    def _drain(self, conn: TankProtocol) -> None:
        """The transport went below its low-water mark: take what waits in the core, in chunks."""
        try:
            while conn.writable:
                data = self._core.data_to_send(conn.conn_id, DRAIN_CHUNK)
                if not data:
                    if data is None:
                        self._end(conn)
                    return
                conn.transport.write(data)  # type: ignore[union-attr]
        except Exception as exc:  # a bug of ours
            self._fail(exc)
        if self._core.turn_wanted:
            self._turn_wanted()

    def _end(self, conn: TankProtocol, *, abort: bool = False) -> None:
        """Abort, or close once what was written is sent (the core aborts it after close_timeout)."""
        conn.gone, conn.writable = True, False
        transport = conn.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        elif transport.can_write_eof() and not transport.is_closing():
            # Linger: FIN after our last bytes (a Close frame, an error answer), then read on (the
            # core ignores it) until the peer's FIN, so input we never read cannot turn our close
            # into a reset. eof_received lets the transport close itself then.
            try:
                transport.write_eof()
            except OSError:  # the peer is already gone (ENOTCONN): nothing to linger for
                transport.abort()
                return
            transport.resume_reading()
        else:
            transport.close()

    def _abort_all(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in self._opening.values():
            task.cancel()
        self._opening.clear()
        for conn in list(self._conns.values()):
            self._end(conn, abort=True)
        if self._serving and self._finisher is None:
            self._finisher = self._loop.create_task(self._finish(), name="tank-shutdown")

    # ------------------------------------------------------------------ time, tasks, hooks

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and not self._stopped:
            self._timer = _clock.arm(self._loop, deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_fired()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        task: asyncio.Task[None] = self._loop.create_task(job())  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hooks_waiting(self) -> None:
        if self._hooks_over:
            return self._drop_queued_hooks()
        if self._hook_worker is None:
            self._hook_worker = self._loop.create_task(self._work_hooks(), name="tank-hooks")
        self._hook_wake.set()

    async def _work_hooks(self) -> None:
        while not self._hooks_over:
            await self._hook_wake.wait()
            self._hook_wake.clear()
            try:
                await self._run_queued_hooks()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the worker itself is being stopped
                # A hook that awaited something cancelled: its own failure, not the worker's.
                logging.getLogger("tank").exception("a coroutine hook was cancelled")
                if self._hooks_queued:
                    self._hook_wake.set()


class serve:
    """``async with serve(config, host, port, **hooks) as server:`` runs a Tank server; leaving the
    block shuts it down gracefully (and re-raises a server failure, if one happened).
    ``redis_url="redis://HOST:PORT/DB"`` makes it one node of a cluster (docs/scale-out.md);
    ``ssl=`` (a server-side ``ssl.SSLContext``) serves ``wss://`` and the HTTP API over HTTPS."""

    def __init__(
        self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8080, *,
        authenticate: AuthHook | None = None, authorize_subscribe: SubscribeHook | None = None,
        on_connect: Hook | None = None, on_disconnect: Hook | None = None,
        on_message: Hook | None = None, on_error: Hook | None = None, on_event: Hook | None = None,
        hook_queue_size: int = HOOK_QUEUE_SIZE, redis_url: str | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.server = Server(
            config, host, port, authenticate=authenticate, authorize_subscribe=authorize_subscribe,
            on_connect=on_connect, on_disconnect=on_disconnect, on_message=on_message,
            on_error=on_error, on_event=on_event, hook_queue_size=hook_queue_size,
            redis_url=redis_url, ssl=ssl,
        )

    async def __aenter__(self) -> Server:
        await self.server.start()
        return self.server

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.server.shutdown()
        if self.server.failure is not None and exc is None:
            raise self.server.failure
