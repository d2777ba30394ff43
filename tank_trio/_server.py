"""The trio adapter: a byte pump between sockets and ``tank_core.TankServer``, one timer task.

docs/adapters.md is the contract. Per connection there is a reader task (reads into
``core.receive``, paused on the core's word) and exactly one writer task, the only code that writes
to that socket: it drains the control lane first, joins every queued data chunk into one write and
reports ``core.flushed`` after each. For the whole server there is one timer task asleep in a
``CancelScope`` whose deadline is ``core.next_deadline()`` (DESIGN.md §2, trio). Core calls are
synchronous, so carrying out their actions never awaits: bytes are queued and writers woken.

Accepted sockets leave trio's ``SocketStream`` for the plain non-blocking socket, driven with
``trio.lowlevel.wait_readable``/``wait_writable``: a write that the kernel takes at once costs no
extra trip through the scheduler, which is most of the price of a fan-out delivery (issue 3 target:
trio fan-out at least 0.6x asyncio's). ``notify_closing`` before every close keeps trio's rules.

Starting and stopping are in ``_serve.py``. If a core call fails with anything but a caller's
mistake, the core is poisoned: every socket is aborted and ``serve`` re-raises the failure.

With a broker (``redis_url=`` or ``config.broker``), ``_broker.py`` carries the core's two Redis
connections as tasks of the same nursery; the link's deadlines join the one timer (DESIGN.md §2).
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio
from trio.lowlevel import current_task, reschedule, wait_readable, wait_task_rescheduled

from tank_core import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    BrokerClose,
    BrokerConnect,
    BrokerDown,
    BrokerGap,
    BrokerUp,
    BrokerWrite,
    BytesReceived,
    CloseTransport,
    ConfigError,
    DiscardPending,
    LocalProtocolError,
    Notification,
    PauseReading,
    ResumeReading,
    SendBytes,
    SendBytesToEach,
    SendControl,
    ServerConfig,
    ServerStats,
    TankServer,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
    UpgradeRequest,
)
from tank_core.trace import FrameTracer

from ._broker import BrokerPump
from ._connection import Connection, abort_wait, close_socket, describe, send_rest
from ._hooks import (
    AuthHook,
    HookRunner,
    SubscribeHook,
    Verdict,
    finish_verdict,
    sync_verdict,
    verdict,
)
from ._hooks import is_async as _auth_is_async

__all__ = ["Server"]

logger = logging.getLogger("tank")
broker_logger = logging.getLogger("tank.broker")

_RECEIVE_SIZE = 65536
#: trio never wakes a deadline early; this only keeps a re-armed (later) deadline from being
#: mistaken for the one that fired (the early-wake guard of DESIGN.md §2).
_EARLY_WAKE_SLACK = 0.001
#: shutdown(): connections get ``close_timeout`` + this to finish (the core aborts stragglers
#: ``close_timeout`` after its Close); then the rest are aborted and their tasks get _KILL_GRACE to
#: report. Both together stay under the ``close_timeout`` + 1 s bound of docs/adapters.md.
_SHUTDOWN_SLACK = 0.5
_KILL_GRACE = 0.25
#: accept() errors that mean "out of file descriptors or memory": wait and retry.
_CAPACITY_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS") if hasattr(errno, name)
)


def _frame_tracer() -> FrameTracer | None:
    """``tank serve --log-level debug``: one log line per frame in and out, when logger
    ``tank.frames`` is enabled for DEBUG as the server starts (the core describes the frames;
    without it the adapter pays one ``is None`` test per read and per batch)."""
    frames = logging.getLogger("tank.frames")
    if not frames.isEnabledFor(logging.DEBUG):
        return None
    return FrameTracer(frames.debug)


class Server:
    """A running Tank server (docs/embedding.md, "The server object"). Made by ``serve``."""

    def __init__(
        self,
        config: ServerConfig | None,
        *,
        authenticate: AuthHook | None,
        authorize_subscribe: SubscribeHook | None,
        hooks: HookRunner,
    ) -> None:
        config = config if config is not None else ServerConfig()
        if authenticate is not None and not config.authenticate:
            config = replace(config, authenticate=True)
        if config.authenticate and authenticate is None:
            raise ConfigError("ServerConfig.authenticate is set but serve() got no authenticate hook")
        if authorize_subscribe is not None and not config.authorize_subscriptions:
            config = replace(config, authorize_subscriptions=True)
        if config.authorize_subscriptions and authorize_subscribe is None:
            raise ConfigError(
                "ServerConfig.authorize_subscriptions is set but serve() got no authorize_subscribe hook"
            )
        self.config = config
        self._core = TankServer(config)
        self._authenticate = authenticate
        self._authorize_subscribe = authorize_subscribe
        self._hooks = hooks
        self._conns: dict[int, Connection] = {}
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._armed = math.inf
        self._failure: BaseException | None = None
        self._shutdown_started = False
        self._shutdown_done = trio.Event()
        self._stopped = trio.Event()
        self._idle: trio.Event | None = None
        self._worker_done = trio.Event()
        self._cancelled_from_outside = False
        self._leaving = False
        self._tracer: FrameTracer | None = None
        #: One read buffer for every reader (only one runs at a time): no 64 KiB allocation per read.
        self._receive_buffer = bytearray(_RECEIVE_SIZE)
        self._receive_view = memoryview(self._receive_buffer)
        self._broker: BrokerPump | None = None
        self.host = ""
        self.port = 0

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """``ws://host:port/path`` with the real port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.config.path}"

    @property
    def dropped_events(self) -> int:
        """Notifications dropped because the coroutine hooks could not keep up."""
        return self._hooks.dropped

    def stats(self) -> ServerStats:
        """The counters behind ``/api/stats``."""
        return self._core.stats()

    def publish(self, topic: str, data: str) -> int:
        """``{"topic":T,"data":D}`` to each subscriber of ``topic``; returns how many."""
        return self._command(
            "publish", lambda now, wall: self._core.publish(topic, data, now=now, wall_time=wall)
        )

    def broadcast(self, data: str, exclude: int | None = None) -> int:
        """Raw text to every connection (but connection id ``exclude``); returns how many."""
        return self._command(
            "broadcast",
            lambda now, wall: self._core.broadcast(data, exclude=exclude, now=now, wall_time=wall),
        )

    def send(self, user_id: str, text: str) -> int:
        """Raw text to every connection of ``user_id``; returns how many."""
        return self._command(
            "send",
            lambda now, wall: self._core.send_to_user(user_id, text, now=now, wall_time=wall),
        )

    def disconnect(self, user_id: str) -> int:
        """Close every connection of ``user_id`` with 1000; returns how many."""
        return self._command(
            "disconnect",
            lambda now, wall: self._core.disconnect_user(user_id, now=now, wall_time=wall),
        )

    def _command(
        self, name: str, call: Callable[[float, float], tuple[int, list[Action]]]
    ) -> int:
        """Run an application command on the core and carry out its actions; returns its count.
        The caller's misuse (LocalProtocolError) is theirs; anything else poisons the server."""
        self._check_usable(name)
        try:
            count, actions = call(trio.current_time(), time.time())
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        self._after(actions)
        return count

    async def shutdown(self) -> None:
        """Graceful shutdown (PROTOCOL.md): stop accepting, ``Server is shutting down`` and Close
        1001 to everyone, flush within ``close_timeout``, then abort what is left. Returns when every
        connection is gone and the listener is closed; a second call waits for the first."""
        if self._shutdown_started:
            await self._shutdown_done.wait()
            return
        self._shutdown_started = True
        deadline = trio.current_time() + self.config.close_timeout + _SHUTDOWN_SLACK
        try:
            self._close_listeners()
            if self._failure is None:
                try:
                    actions = self._core.shutdown(now=trio.current_time(), wall_time=time.time())
                except Exception as exc:
                    self._fail(exc)
                else:
                    self._after(actions)
            idle = self._idle = trio.Event()
            if self._conns:
                with trio.move_on_at(deadline):
                    await idle.wait()
            if self._conns:
                for conn in list(self._conns.values()):
                    self._kill(conn)
                # Killed sockets wake their tasks at once; let them report before hooks close.
                with trio.move_on_after(_KILL_GRACE):
                    await idle.wait()
            self._hooks.close()
            if self._hooks.needs_worker:
                with trio.move_on_at(deadline + _KILL_GRACE):
                    await self._worker_done.wait()
        finally:
            self._shutdown_done.set()
            self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait until the server has stopped (after ``shutdown()``, a cancellation or a failure)."""
        await self._stopped.wait()

    def _check_usable(self, what: str) -> None:
        if self._failure is not None:
            raise LocalProtocolError(
                f"{what}(): the server failed and stopped; see the chained exception"
            ) from self._failure
        if self._shutdown_started:
            raise LocalProtocolError(f"{what}(): the server is shutting down")

    # ------------------------------------------------------------------ actions

    def _after(self, actions: list[Action]) -> None:
        """Carry out one batch of core actions, then re-arm the timer."""
        if actions:
            self._dispatch(actions)
        self._rearm()

    def _dispatch(self, actions: list[Action]) -> None:
        """Transport actions at once, in order; notifications and verdicts after them, so a hook
        that calls back into the server never splits a batch."""
        if self._tracer is not None:
            self._tracer.sent(actions)
        conns = self._conns
        later: list[Notification | AuthorizeUpgrade | AuthorizeSubscription] | None = None
        for action in actions:
            match action:
                case SendBytesToEach(conn_ids=conn_ids, data=data):
                    # The fan-out hot path: one append and at most one wake-up per recipient.
                    get = conns.get
                    wake = reschedule
                    for conn_id in conn_ids:
                        conn = get(conn_id)
                        if conn is not None:
                            conn.data.append(data)
                            task = conn.parked
                            if task is not None:
                                conn.parked = None
                                wake(task)
                case SendBytes(conn_id=conn_id, data=data):
                    conn = conns.get(conn_id)
                    if conn is not None:
                        conn.data.append(data)
                        conn.wake()
                case SendControl(conn_id=conn_id, data=data):
                    conn = conns.get(conn_id)
                    if conn is not None:
                        conn.control.append(data)
                        conn.wake()
                case DiscardPending(conn_id=conn_id):
                    conn = conns.get(conn_id)
                    if conn is not None:
                        conn.data = []  # a write already started finishes (docs/adapters.md)
                case CloseTransport(conn_id=conn_id):
                    conn = conns.get(conn_id)
                    if conn is not None and not conn.closing:
                        # The core gives it close_timeout to be reported gone, then aborts it.
                        conn.closing = True
                        conn.wake()
                case AbortTransport(conn_id=conn_id):
                    conn = conns.get(conn_id)
                    if conn is not None:
                        self._kill(conn)
                case PauseReading(conn_id=conn_id):
                    conn = conns.get(conn_id)
                    if conn is not None and conn.resume is None:
                        conn.resume = trio.Event()
                case ResumeReading(conn_id=conn_id):
                    conn = conns.get(conn_id)
                    if conn is not None and conn.resume is not None:
                        conn.resume.set()
                        conn.resume = None
                case BrokerWrite():
                    if self._broker is not None:
                        self._broker.write(action)
                case BrokerConnect():
                    if self._broker is not None:
                        self._broker.connect(action)
                case BrokerClose():
                    if self._broker is not None:
                        self._broker.close(action)
                case _:
                    if later is None:
                        later = []
                    later.append(action)
        if later is not None:
            notify = self._hooks.notify
            for action in later:
                if isinstance(action, AuthorizeUpgrade):
                    self._authorize(action.conn_id, action.request)
                elif isinstance(action, AuthorizeSubscription):
                    self._authorize_subscription(action)
                else:
                    if isinstance(action, BrokerUp | BrokerDown | BrokerGap):
                        _log_broker(action)
                    notify(action)

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        when = math.inf if deadline is None else deadline
        if when != self._armed:
            self._armed = when
            scope = self._timer_scope
            if scope is not None:
                scope.deadline = when

    def broker_reports_wanted(self) -> bool:
        """Whether events of the Redis connections still go to the core."""
        return self._failure is None and not self._stopped.is_set()

    def _kill(self, conn: Connection) -> None:
        """Drop the socket now, whatever is queued; both tasks of the connection leave."""
        if conn.dead:
            return
        conn.dead = True
        conn.control = []
        conn.data = []
        close_socket(conn.sock)  # wakes a pending read or write wait with ClosedResourceError
        if conn.resume is not None:
            conn.resume.set()
            conn.resume = None
        conn.wake()

    def _fail(self, exc: BaseException) -> None:
        """The core (or this adapter) failed: abort every socket and stop; serve() re-raises."""
        if self._failure is None:
            self._failure = exc
            logger.error("tank server failed; aborting every connection", exc_info=exc)
        for conn in list(self._conns.values()):
            self._kill(conn)
        self._close_listeners()
        self._stopped.set()

    # ------------------------------------------------------------------ authentication

    def _authorize(self, conn_id: int, request: UpgradeRequest) -> None:
        hook = self._authenticate
        assert hook is not None  # checked when the server was built
        nursery = self._nursery
        if _auth_is_async(hook):
            if nursery is not None:
                nursery.start_soon(self._authorize_later, conn_id, verdict(hook, request))
            return
        answer = sync_verdict(hook, request)
        if isinstance(answer, tuple):
            self._give_verdict(conn_id, answer)
        elif nursery is not None:
            nursery.start_soon(self._authorize_later, conn_id, finish_verdict(answer))

    async def _authorize_later(self, conn_id: int, pending: Awaitable[Verdict]) -> None:
        self._give_verdict(conn_id, await pending)

    def _give_verdict(self, conn_id: int, answer: Verdict) -> None:
        if self._failure is not None:
            return
        accepted, status, reason = answer
        now, wall = trio.current_time(), time.time()
        event: UpgradeAuthorized | UpgradeRefused
        if accepted:
            event = UpgradeAuthorized(conn_id=conn_id, now=now, wall_time=wall)
        else:
            event = UpgradeRefused(conn_id=conn_id, now=now, wall_time=wall, status=status, reason=reason)
        try:
            actions = self._core.receive(event)
        except LocalProtocolError:
            logger.exception("verdict for connection %d not accepted by the core", conn_id)
            return
        except Exception as exc:
            self._fail(exc)
            return
        self._after(actions)

    def _authorize_subscription(self, ask: AuthorizeSubscription) -> None:
        hook = self._authorize_subscribe
        assert hook is not None  # checked when the server was built
        try:
            result = hook(ask, ask.topic)
        except Exception:
            logger.exception("authorize_subscribe raised: refusing the subscription")
            self._subscription_verdict(ask, False)
            return
        if inspect.isawaitable(result):
            if self._nursery is not None:
                self._nursery.start_soon(self._subscription_verdict_later, ask, result)
        else:
            self._subscription_verdict(ask, result is True)

    async def _subscription_verdict_later(
        self, ask: AuthorizeSubscription, pending: Awaitable[object]
    ) -> None:
        try:
            allowed = (await pending) is True
        except Exception:
            logger.exception("authorize_subscribe raised: refusing the subscription")
            allowed = False
        self._subscription_verdict(ask, allowed)

    def _subscription_verdict(self, ask: AuthorizeSubscription, allowed: bool) -> None:
        if self._failure is not None:
            return
        try:
            actions = self._core.subscription_verdict(
                ask.conn_id, ask.topic, allowed, now=trio.current_time(), wall_time=time.time()
            )
        except LocalProtocolError:
            logger.exception("subscription verdict for connection %d not accepted", ask.conn_id)
            return
        except Exception as exc:
            self._fail(exc)
            return
        self._after(actions)

    # ------------------------------------------------------------------ tasks

    async def _timer(self) -> None:
        """The one timer of the server: sleeps until ``next_deadline()``, ticks, loops."""
        core = self._core
        while True:
            with trio.CancelScope(deadline=self._armed) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            fired = scope.deadline
            if fired <= now + _EARLY_WAKE_SLACK:
                now = max(now, fired)
            try:
                actions = core.tick(now, wall_time=time.time())
            except Exception as exc:
                self._fail(exc)
                return
            self._after(actions)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno in _CAPACITY_ERRNOS:
                    logger.error("accept() failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            try:
                # From trio's socket to the plain one (TCP_NODELAY already set by trio).
                sock = socket.socket(fileno=stream.socket.detach())
                sock.setblocking(False)
                peer = sock.getpeername()
            except OSError:
                stream.socket.close()
                continue  # gone before we looked
            self._open(sock, peer[0] if isinstance(peer, tuple) else str(peer))

    def _open(self, sock: socket.socket, peer_host: str) -> None:
        try:
            conn_id = self._core.accept(peer_host=peer_host, now=trio.current_time())
        except Exception as exc:
            sock.close()
            self._fail(exc)
            return
        conn = Connection(conn_id, sock)
        self._conns[conn_id] = conn
        nursery = self._nursery
        assert nursery is not None
        nursery.start_soon(self._reader, conn, name=f"tank reader {conn_id}")
        nursery.start_soon(self._writer, conn, name=f"tank writer {conn_id}")
        self._rearm()

    async def _reader(self, conn: Connection) -> None:
        core = self._core
        conn_id = conn.conn_id
        sock = conn.sock
        recv_into = sock.recv_into
        buffer = self._receive_buffer
        view = self._receive_view
        error: str | None = None
        eof = False
        try:
            while not conn.dead:
                paused = conn.resume
                if paused is not None:
                    await paused.wait()
                    continue
                await wait_readable(sock)  # also this task's checkpoint: a flood cannot starve others
                try:
                    size = recv_into(buffer)
                except BlockingIOError:
                    continue
                if not size:
                    eof = True
                    break
                data = view[:size].tobytes()
                if self._tracer is not None:
                    self._tracer.received(conn_id, data)
                try:
                    actions = core.receive(
                        BytesReceived(
                            conn_id=conn_id, data=data, now=trio.current_time(), wall_time=time.time()
                        )
                    )
                except Exception as exc:
                    self._fail(exc)
                    return
                self._after(actions)
        except trio.ClosedResourceError:
            pass  # we closed it
        except OSError as exc:
            if not conn.dead:
                error = describe(exc)  # a reset
        finally:
            self._task_done(conn)
        if error is not None:
            self._gone(conn, error)
            self._kill(conn)
        elif eof and not conn.dead:
            # Half-closed by the peer: what is queued (an HTTP answer, say) still goes out, then
            # the writer closes and reports. Until then the core's own deadlines bound it.
            conn.closing = True
            conn.wake()
        else:
            self._gone(conn)  # closed by us: the core's close completing (or an abort)

    async def _writer(self, conn: Connection) -> None:
        """The only code that writes to ``conn.sock``: control lane first, then the data lane,
        joined into one write; ``core.flushed`` after each. Parks when there is nothing to do."""
        conn_id = conn.conn_id
        flushed = self._core.flushed
        sock = conn.sock
        send = sock.send
        me = current_task()
        try:
            while not conn.dead:
                control = conn.control
                data = conn.data
                if control:
                    conn.control = []
                    control_bytes = sum(map(len, control))
                    if data:
                        conn.data = []
                        control += data
                    buf = b"".join(control)
                    data_bytes = len(buf) - control_bytes
                elif data:
                    conn.data = []
                    buf = data[0] if len(data) == 1 else b"".join(data)
                    control_bytes = 0
                    data_bytes = len(buf)
                elif conn.closing:
                    break
                else:
                    conn.parked = me
                    await wait_task_rescheduled(abort_wait)  # until Connection.wake
                    continue
                try:
                    sent = send(buf)
                except BlockingIOError:
                    sent = 0
                if sent < len(buf):
                    await send_rest(sock, buf, sent)
                flushed(conn_id, data_bytes, control_bytes)
        except trio.ClosedResourceError:
            pass  # we closed it (AbortTransport)
        except OSError as exc:
            if not conn.dead:
                self._gone(conn, describe(exc), write_failed=True)
        finally:
            conn.parked = None
            self._kill(conn)
            self._task_done(conn)
        self._gone(conn)  # closed after its last bytes (CloseTransport, EOF), or aborted

    def _gone(self, conn: Connection, error: str | None = None, write_failed: bool = False) -> None:
        """Tell the core the socket is gone, once (EOF, reset, write error, our close completing)."""
        if conn.reported:
            return
        conn.reported = True
        if self._failure is not None:
            return
        try:
            actions = self._core.receive(
                TransportClosed(
                    conn_id=conn.conn_id,
                    now=trio.current_time(),
                    wall_time=time.time(),
                    error=error,
                    write_failed=write_failed,
                )
            )
        except Exception as exc:
            self._fail(exc)
            return
        self._after(actions)

    def _task_done(self, conn: Connection) -> None:
        conn.tasks -= 1
        if conn.tasks == 0:
            close_socket(conn.sock)
            self._conns.pop(conn.conn_id, None)
            if self._tracer is not None:
                self._tracer.forget(conn.conn_id)
            if not self._conns and self._idle is not None:
                self._idle.set()

    async def _hook_worker(self) -> None:
        try:
            await self._hooks.run_worker()
        finally:
            self._worker_done.set()

    # ------------------------------------------------------------------ lifetime

    async def _listen(self, host: str, port: int) -> None:
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = self._listeners[0].socket.getsockname()
        self.host = host or sockname[0]
        self.port = int(sockname[1])

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.socket.close()

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._tracer = _frame_tracer()
        nursery.start_soon(self._timer, name="tank timer")
        if self._hooks.needs_worker:
            nursery.start_soon(self._hook_worker, name="tank hook worker")
        else:
            self._worker_done.set()
        for listener in self._listeners:
            nursery.start_soon(self._accept_loop, listener, name="tank accept")
        if self.config.broker is not None:
            self._broker = BrokerPump(self, nursery)
            try:
                actions = self._core.broker_start(now=trio.current_time(), wall_time=time.time())
            except Exception as exc:
                self._fail(exc)
                return
            self._dispatch(actions)
        self._rearm()


def _log_broker(event: BrokerUp | BrokerDown | BrokerGap) -> None:
    match event:
        case BrokerUp(downtime=None):
            broker_logger.info("broker up")
        case BrokerUp(downtime=downtime):
            broker_logger.warning("broker up again after %.3f s down", downtime)
        case BrokerDown(reason=reason):
            broker_logger.warning("broker down (%s): local delivery goes on; reconnecting", reason)
        case BrokerGap(origin=origin, channel=channel, missed=missed):
            broker_logger.warning("broker gap: %d message(s) from node %s on %s never arrived",
                                  missed, origin, channel)
