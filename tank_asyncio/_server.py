"""The asyncio adapter: the sans-IO ``TankServer`` over ``loop.create_server``.

A byte pump (DESIGN.md §1): a listener, one ``TankProtocol`` per socket (its reader and its one
writer), and **one** timer (``_clock.py``) for the whole server, armed for ``next_deadline()`` and
re-armed only when that moves earlier (a timer that fires early finds nothing due and re-arms).
No task per connection: reads arrive as protocol callbacks, writes go straight to the transport.

Hooks (``_hooks.py``) run after the writes of the batch that produced their events.

With a broker (``redis_url=`` or ``config.broker``), ``_broker.py`` carries the core's two Redis
connections; the link's deadlines join the same one timer (DESIGN.md §2).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType

from tank_core import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    BrokerClose,
    BrokerConfig,
    BrokerConnect,
    BrokerDown,
    BrokerGap,
    BrokerUp,
    BrokerWrite,
    CloseTransport,
    ConfigError,
    DiscardPending,
    LocalProtocolError,
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
)

from . import _clock
from ._broker import BrokerPump
from ._hooks import (
    HOOK_QUEUE_SIZE,
    AuthHook,
    Hook,
    HookRunner,
    SubscribeHook,
    Verdict,
    await_verdict,
    interpret_verdict,
)
from ._protocol import TankProtocol
from ._trace import FrameTracer, make_tracer

__all__ = ["Server", "serve"]

logger = logging.getLogger("tank")
broker_logger = logging.getLogger("tank.broker")

#: The transport's write-buffer high-water mark: above it, writes are held here and count as
#: unsent in the core, so a reader that stopped shows up as a slow consumer promptly.
WRITE_HIGH_WATER = 64 * 1024
#: Bytes of held data handed to the transport per write when it becomes writable again.
DRAIN_CHUNK = 64 * 1024
#: Listen backlog: reconnect storms (tank-websocket.js retries every second) arrive at once.
BACKLOG = 4096


class Server:
    """A running Tank server on asyncio; get one from ``async with serve(...) as server``."""

    def __init__(
        self,
        config: ServerConfig | None,
        host: str,
        port: int,
        *,
        authenticate: AuthHook | None = None,
        authorize_subscribe: SubscribeHook | None = None,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_message: Hook | None = None,
        on_error: Hook | None = None,
        on_event: Hook | None = None,
        hook_queue_size: int = HOOK_QUEUE_SIZE,
        redis_url: str | None = None,
    ) -> None:
        config = config if config is not None else ServerConfig()
        if redis_url is not None:
            config = replace(config, broker=BrokerConfig.from_url(redis_url))
        if authorize_subscribe is not None:
            config = replace(config, authorize_subscriptions=True)
        elif config.authorize_subscriptions:
            raise ConfigError(
                "config.authorize_subscriptions is set but serve() got no authorize_subscribe hook"
            )
        self._authorize_subscribe = authorize_subscribe
        if authenticate is not None:
            config = replace(config, authenticate=True)
        elif config.authenticate:
            raise ConfigError("config.authenticate is set but serve() got no authenticate hook")
        if isinstance(hook_queue_size, bool) or not isinstance(hook_queue_size, int) or (
            hook_queue_size <= 0
        ):
            raise ConfigError(f"hook_queue_size must be an integer > 0, got {hook_queue_size!r}")
        self.config = config
        self._core = TankServer(config)
        self._requested_host = host
        self._requested_port = port
        self.host = host
        self.port = port

        self._authenticate = authenticate
        self._hooks = HookRunner(
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_message=on_message,
            on_error=on_error,
            on_event=on_event,
            queue_size=hook_queue_size,
        )
        #: Action types handled after the batch's writes: hooks and authorization.
        self._deferred_types = frozenset(self._hooks.table) | {
            AuthorizeUpgrade,
            AuthorizeSubscription,
        }
        if config.broker is not None:
            self._deferred_types |= {BrokerUp, BrokerDown, BrokerGap}  # logged, then hooks
        self._broker: BrokerPump | None = None

        self._conns: dict[int, TankProtocol] = {}
        #: Sockets with writes gathered in this loop iteration (see _flush_touched).
        self._touched: list[TankProtocol] = []
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        self._listener: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf
        self._auth_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing = False
        self._stopped = False
        self._failure: BaseException | None = None
        self._all_gone: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._debug = False
        self._tracer: FrameTracer | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """``ws://host:port/path`` with the real port."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"ws://{host}:{self.port}{self.config.path}"

    def publish(self, topic: str, data: str) -> int:
        """``{"topic":T,"data":D}`` to each subscriber of ``topic``; returns how many."""
        return self._command(
            lambda now, wall: self._core.publish(topic, data, now=now, wall_time=wall)
        )

    def broadcast(self, data: str, exclude: int | None = None) -> int:
        """Raw text to every connection (but connection id ``exclude``); returns how many."""
        return self._command(
            lambda now, wall: self._core.broadcast(data, exclude=exclude, now=now, wall_time=wall)
        )

    def send(self, user_id: str, text: str) -> int:
        """Raw text to every connection of ``user_id``; returns how many."""
        return self._command(
            lambda now, wall: self._core.send_to_user(user_id, text, now=now, wall_time=wall)
        )

    def disconnect(self, user_id: str) -> int:
        """Close every connection of ``user_id`` with 1000; returns how many."""
        return self._command(
            lambda now, wall: self._core.disconnect_user(user_id, now=now, wall_time=wall)
        )

    def _command(self, call: Callable[[float, float], tuple[int, list[Action]]]) -> int:
        """Run an application command on the core and dispatch its actions; returns its count."""
        self._check_usable()
        try:
            count, actions = call(_clock.now(), time.time())
        except Exception as exc:
            self._command_failed(exc)
            raise
        if actions:
            self._dispatch(actions)
        return count

    @property
    def dropped_events(self) -> int:
        """Notifications dropped because coroutine hooks could not keep up."""
        return self._hooks.dropped

    def stats(self) -> ServerStats:
        """The counters behind ``/api/stats``."""
        return self._core.stats()

    async def shutdown(self) -> None:
        """Graceful: ``Server is shutting down``, Close 1001, flush within ``close_timeout``, then
        abort; returns when every connection is gone and the listener is closed."""
        if not self._started:
            return
        if not self._closing:
            self._closing = True
            assert self._listener is not None
            self._listener.close()
            try:
                actions = self._core.shutdown(now=_clock.now(), wall_time=time.time())
            except Exception as exc:
                self._fail(exc)
            else:
                self._dispatch(actions)
            self._start_finisher()
            self._check_done()
        assert self._closed is not None
        await self._closed.wait()

    async def wait_closed(self) -> None:
        """Wait until the server has shut down (or failed)."""
        if self._closed is not None:
            await self._closed.wait()

    @property
    def closing(self) -> bool:
        """True once shutdown (or a failure) has begun."""
        return self._closing

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            raise LocalProtocolError("this server was already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._all_gone = asyncio.Event()
        self._closed = asyncio.Event()
        self._tracer = make_tracer()
        self._debug = self._tracer is not None
        self._listener = await loop.create_server(
            self._protocol_factory, self._requested_host, self._requested_port, backlog=BACKLOG
        )
        sockets = self._listener.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._started = True
        if self.config.broker is not None:
            self._broker = BrokerPump(self)
            try:
                actions = self._core.broker_start(now=_clock.now(), wall_time=time.time())
            except Exception as exc:
                self._fail(exc)
            else:
                self._dispatch(actions)
        self._rearm()

    def _protocol_factory(self) -> TankProtocol:
        return TankProtocol(self)

    def _check_usable(self) -> None:
        if not self._started:
            raise LocalProtocolError("the server is not running: use `async with serve(...)`")
        if self._closing:
            raise LocalProtocolError("the server is shutting down; only stats() is still available")

    def _command_failed(self, exc: Exception) -> None:
        # The caller's mistake (LocalProtocolError) is theirs alone; anything else is a bug in
        # shared state: the server cannot go on (DESIGN.md §4).
        if not isinstance(exc, LocalProtocolError):
            self._fail(exc)

    def _start_finisher(self) -> None:
        if self._finisher is None:
            self._finisher = self._loop.create_task(self._finish(), name="tank-shutdown")

    def _check_done(self) -> None:
        if (
            self._closing
            and not self._conns
            and (self._failure is not None or self._core.finished)
            and self._all_gone is not None
        ):
            self._all_gone.set()

    async def _finish(self) -> None:
        assert self._all_gone is not None and self._closed is not None
        await self._all_gone.wait()
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._broker is not None:
            self._broker.close_all()
        if self._listener is not None:
            await self._listener.wait_closed()
        for task in list(self._auth_tasks):
            task.cancel()
        await self._hooks.close(self.config.close_timeout)
        self._closed.set()

    def _fail(self, exc: BaseException) -> None:
        """A bug in shared state (the core is poisoned): drop everyone and stop (DESIGN.md §4)."""
        if self._failure is not None:
            return
        self._failure = exc
        logger.error("tank server failed; closing every connection", exc_info=exc)
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns.values()):
            self._abort(conn)
        if self._broker is not None:
            self._broker.close_all()
        self._start_finisher()
        self._check_done()

    # ------------------------------------------------------------------ transport callbacks

    def _connection_made(self, conn: TankProtocol, transport: asyncio.Transport) -> None:
        conn.transport = transport
        if self._closing:
            conn.gone = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        peer_host = peer[0] if isinstance(peer, tuple) and peer else str(peer or "")
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            conn_id = self._core.accept(peer_host=peer_host, now=_clock.now())
        except Exception as exc:
            conn.gone = True
            transport.abort()
            self._fail(exc)
            return
        conn.conn_id = conn_id
        self._conns[conn_id] = conn
        self._rearm()

    def _connection_lost(self, conn: TankProtocol, exc: Exception | None) -> None:
        conn.gone = True
        conn.held = conn.held_ctrl = None
        conn_id = conn.conn_id
        if self._conns.pop(conn_id, None) is None:
            return
        if self._tracer is not None:
            self._tracer.forget(conn_id)
        if self._failure is None:
            try:
                actions = self._core.receive(
                    TransportClosed(
                        conn_id=conn_id,
                        now=_clock.now(),
                        wall_time=time.time(),
                        error=None if exc is None else str(exc) or type(exc).__name__,
                    )
                )
            except Exception as error:
                self._fail(error)
            else:
                self._dispatch(actions)
        self._check_done()

    def broker_reports_wanted(self) -> bool:
        """Whether events of the Redis connections still go to the core."""
        return self._failure is None and not self._stopped

    def _trace_in(self, conn: TankProtocol, data: bytes) -> None:
        if self._tracer is not None:
            self._tracer.received(conn.conn_id, data)

    # ------------------------------------------------------------------ actions -> sockets

    def _dispatch(self, actions: list[Action]) -> None:
        """Carry out the core's actions in order; one write per touched socket, then hooks."""
        try:
            self._carry_out(actions)
        except Exception as exc:  # a bug of ours: never leave sockets half-batched
            self._fail(exc)

    def _carry_out(self, actions: list[Action]) -> None:
        if self._tracer is not None:
            self._tracer.sent(actions)
        conns = self._conns
        touched = self._touched
        first_touch = not touched
        deferred: list[Action] | None = None
        # Writes are gathered per socket until the end of this loop iteration (_flush_touched):
        # publishes made in one iteration (say, many triggers read at once) leave as one write
        # per subscriber instead of one per publish per subscriber.
        for action in actions:
            kind = type(action)
            if kind is SendBytesToEach:
                assert isinstance(action, SendBytesToEach)
                data = action.data
                get = conns.get
                for conn_id in action.conn_ids:
                    conn = get(conn_id)
                    if conn is None or conn.gone:
                        continue
                    if conn.batched:
                        lane = conn.b_data
                        if lane is None:
                            conn.b_data = [data]
                        else:
                            lane.append(data)
                    else:
                        conn.b_data = [data]
                        conn.batched = True
                        touched.append(conn)
            elif kind is SendBytes:
                assert isinstance(action, SendBytes)
                conn = conns.get(action.conn_id)
                if conn is not None:
                    conn.gather(action.data, control=False, touched=touched)
            elif kind is SendControl:
                assert isinstance(action, SendControl)
                conn = conns.get(action.conn_id)
                if conn is not None:
                    conn.gather(action.data, control=True, touched=touched)
            elif kind is DiscardPending:
                assert isinstance(action, DiscardPending)
                conn = conns.get(action.conn_id)
                if conn is not None:
                    # The core has already forgotten these bytes: never report them flushed.
                    conn.b_data = None
                    if conn.held:
                        conn.held.clear()
            elif kind is CloseTransport:
                assert isinstance(action, CloseTransport)
                conn = conns.get(action.conn_id)
                if conn is not None:
                    conn.close_after = True
                    conn.touch(touched)
            elif kind is AbortTransport:
                assert isinstance(action, AbortTransport)
                conn = conns.get(action.conn_id)
                if conn is not None:
                    self._abort(conn)
            elif kind is PauseReading:
                assert isinstance(action, PauseReading)
                conn = conns.get(action.conn_id)
                if conn is not None and not conn.gone and conn.transport is not None:
                    conn.transport.pause_reading()
            elif kind is ResumeReading:
                assert isinstance(action, ResumeReading)
                conn = conns.get(action.conn_id)
                if conn is not None and not conn.gone and conn.transport is not None:
                    conn.transport.resume_reading()
            elif kind is BrokerWrite:
                assert isinstance(action, BrokerWrite) and self._broker is not None
                self._broker.write(action)
            elif kind is BrokerConnect:
                assert isinstance(action, BrokerConnect) and self._broker is not None
                self._broker.connect(action)
            elif kind is BrokerClose:
                assert isinstance(action, BrokerClose) and self._broker is not None
                self._broker.close(action)
            elif kind in self._deferred_types:
                if deferred is None:
                    deferred = [action]
                else:
                    deferred.append(action)
        if first_touch and touched:
            self._loop.call_soon(self._flush_touched)
        if deferred is not None:
            self._run_deferred(deferred)
        self._rearm()

    def _flush_touched(self) -> None:
        """End of the loop iteration: one write per socket for everything gathered."""
        touched = self._touched
        self._touched = []
        try:
            for conn in touched:
                self._flush(conn)
        except Exception as exc:  # a bug of ours
            self._fail(exc)

    def _flush(self, conn: TankProtocol) -> None:
        """Write what this loop iteration gathered for ``conn``: one write, control lane first."""
        ctrl = conn.b_ctrl
        data = conn.b_data
        conn.b_ctrl = None
        conn.b_data = None
        conn.batched = False
        if conn.gone:
            return
        if conn.paused:  # pause_writing made the held lanes
            if ctrl is not None:
                conn.held_ctrl.extend(ctrl)  # type: ignore[union-attr]
            if data is not None:
                conn.held.extend(data)  # type: ignore[union-attr]
        elif ctrl is None:
            if data is not None:
                chunk = data[0] if len(data) == 1 else b"".join(data)
                conn.transport.write(chunk)  # type: ignore[union-attr]
                self._core.flushed(conn.conn_id, len(chunk))
        else:
            head = ctrl[0] if len(ctrl) == 1 else b"".join(ctrl)
            if data is None:
                conn.transport.write(head)  # type: ignore[union-attr]
                self._core.flushed(conn.conn_id, 0, len(head))
            else:
                body = data[0] if len(data) == 1 else b"".join(data)
                conn.transport.write(head + body)  # type: ignore[union-attr]
                self._core.flushed(conn.conn_id, len(body), len(head))
        if conn.close_after:
            self._close(conn)

    def _drain(self, conn: TankProtocol) -> None:
        """The transport went below its low-water mark: hand held bytes over, control first."""
        transport = conn.transport
        held = conn.held
        held_ctrl = conn.held_ctrl
        if conn.gone or transport is None or held is None or held_ctrl is None:
            return
        flushed = self._core.flushed
        while not conn.paused and (held or held_ctrl):
            parts: list[bytes] = []
            control_bytes = 0
            if held_ctrl:
                parts.extend(held_ctrl)
                control_bytes = sum(map(len, held_ctrl))
                held_ctrl.clear()
            data_bytes = 0
            while held and data_bytes < DRAIN_CHUNK:
                chunk = held.popleft()
                parts.append(chunk)
                data_bytes += len(chunk)
            transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
            flushed(conn.conn_id, data_bytes, control_bytes)
        if not conn.paused:
            conn.held = conn.held_ctrl = None  # an idle socket keeps no buffers
        if conn.close_after:
            self._close(conn)

    def _close(self, conn: TankProtocol) -> None:
        """Close once everything is written. A peer that will not take the rest is the core's
        business: it asks for an abort when the socket is not gone within ``close_timeout``."""
        transport = conn.transport
        if conn.gone or transport is None:
            return
        if conn.held or conn.held_ctrl:
            return  # closed by _drain when the held bytes are handed over
        conn.gone = True
        transport.close()

    def _abort(self, conn: TankProtocol) -> None:
        conn.gone = True
        conn.b_ctrl = None
        conn.b_data = None
        conn.held = conn.held_ctrl = None
        if conn.transport is not None:
            conn.transport.abort()

    # ------------------------------------------------------------------ hooks and verdicts

    def _run_deferred(self, deferred: list[Action]) -> None:
        notify = self._hooks.notify
        for action in deferred:
            if type(action) is AuthorizeUpgrade:
                assert isinstance(action, AuthorizeUpgrade)
                self._authorize(action)
            elif type(action) is AuthorizeSubscription:
                assert isinstance(action, AuthorizeSubscription)
                self._authorize_subscription(action)
            else:
                if type(action) in (BrokerUp, BrokerDown, BrokerGap):
                    _log_broker(action)  # type: ignore[arg-type]
                notify(action)  # type: ignore[arg-type]  # only notification types are deferred

    def _authorize(self, action: AuthorizeUpgrade) -> None:
        fn = self._authenticate
        conn_id = action.conn_id
        if fn is None:  # cannot happen: Server() refuses config.authenticate without a hook
            self._verdict(conn_id, (False, 401, "Unauthorized"))
            return
        try:
            result = fn(action.request)
        except Exception:
            logger.exception("authenticate raised: refusing the upgrade with 401")
            self._verdict(conn_id, (False, 401, "Unauthorized"))
            return
        if inspect.isawaitable(result):
            # One short-lived task per pending upgrade (the hook may await a database).
            task = self._loop.create_task(self._verdict_later(conn_id, result))
            self._auth_tasks.add(task)
            task.add_done_callback(self._auth_tasks.discard)
        else:
            self._verdict(conn_id, interpret_verdict(result))

    def _authorize_subscription(self, ask: AuthorizeSubscription) -> None:
        fn = self._authorize_subscribe
        if fn is None:  # cannot happen: Server() refuses the config without a hook
            self._subscription_verdict(ask, False)
            return
        try:
            result = fn(ask, ask.topic)
        except Exception:
            logger.exception("authorize_subscribe raised: refusing the subscription")
            self._subscription_verdict(ask, False)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._subscription_verdict_later(ask, result))
            self._auth_tasks.add(task)
            task.add_done_callback(self._auth_tasks.discard)
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
        if self._failure is None and not self._stopped:
            self._subscription_verdict(ask, allowed)

    def _subscription_verdict(self, ask: AuthorizeSubscription, allowed: bool) -> None:
        try:
            actions = self._core.subscription_verdict(
                ask.conn_id, ask.topic, allowed, now=_clock.now(), wall_time=time.time()
            )
        except Exception as exc:
            self._fail(exc)
            return
        self._dispatch(actions)

    async def _verdict_later(self, conn_id: int, pending: Awaitable[object]) -> None:
        verdict = await await_verdict(pending)
        if self._failure is None:
            self._verdict(conn_id, verdict)

    def _verdict(self, conn_id: int, verdict: Verdict) -> None:
        accepted, status, reason = verdict
        now = _clock.now()
        wall_time = time.time()
        event: UpgradeAuthorized | UpgradeRefused
        if accepted:
            event = UpgradeAuthorized(conn_id=conn_id, now=now, wall_time=wall_time)
        else:
            event = UpgradeRefused(
                conn_id=conn_id, now=now, wall_time=wall_time, status=status, reason=reason
            )
        try:
            actions = self._core.receive(event)
        except Exception as exc:
            self._fail(exc)
            return
        self._dispatch(actions)

    # ------------------------------------------------------------------ the one timer

    def _rearm(self) -> None:
        if self._stopped:
            return
        deadline = self._core.next_deadline()
        if deadline is None:
            return  # an armed timer that fires early finds nothing due and re-arms
        if self._timer is None or deadline < self._armed:
            if self._timer is not None:
                self._timer.cancel()
            self._armed = deadline
            self._timer = _clock.arm(self._loop, deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        armed = self._armed
        self._armed = math.inf
        if self._stopped or self._failure is not None:
            return
        now = _clock.now()
        if now < armed:
            self._rearm()  # early (rare, thanks to TIMER_SLACK): never tick with a forged clock
            return
        try:
            actions = self._core.tick(now, wall_time=time.time())
        except Exception as exc:
            self._fail(exc)
            return
        self._dispatch(actions)

    # ------------------------------------------------------------------ introspection for tests

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The one timer of this server (None while nothing is due)."""
        return self._timer

    @property
    def core(self) -> TankServer:
        """The sans-IO server underneath (for tests and tools; do not drive it directly)."""
        return self._core


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


class serve:
    """``async with serve(config, host, port, **hooks) as server:`` runs a Tank server; leaving the
    block shuts it down gracefully (and re-raises a server failure, if one happened).
    ``redis_url="redis://HOST:PORT/DB"`` makes it one node of a cluster (docs/scale-out.md)."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        authenticate: AuthHook | None = None,
        authorize_subscribe: SubscribeHook | None = None,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_message: Hook | None = None,
        on_error: Hook | None = None,
        on_event: Hook | None = None,
        hook_queue_size: int = HOOK_QUEUE_SIZE,
        redis_url: str | None = None,
    ) -> None:
        self.server = Server(
            config,
            host,
            port,
            authenticate=authenticate,
            authorize_subscribe=authorize_subscribe,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_message=on_message,
            on_error=on_error,
            on_event=on_event,
            hook_queue_size=hook_queue_size,
            redis_url=redis_url,
        )

    async def __aenter__(self) -> Server:
        await self.server.start()
        return self.server

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server = self.server
        await server.shutdown()
        if server._failure is not None and exc is None:
            raise server._failure
