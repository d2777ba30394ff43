"""The session rules every server adapter shares, written once: an adapter's ``Server`` is a
``ServerSession`` that supplies sockets, a clock, sleeping and spawning, and nothing else.

What is decided here, for asyncio, trio and any transport of yours alike (docs/embedding.md):

- ``serve()``'s arguments become a ``ServerConfig`` (an ``authenticate`` hook turns on
  ``config.authenticate``; ``redis_url=`` is ``config.broker``), with a ``ConfigError`` for
  what cannot work;
- each batch of core actions is carried out in order, then the sockets with output are named
  (``_output_ready``), then hooks run, so a hook that publishes never splits a batch;
- hooks: plain functions inline, coroutine functions (and objects with an async ``__call__``)
  through one bounded queue that drops and counts; a hook of two parameters also gets the server;
- verdicts: ``authenticate`` and ``authorize_subscribe``, sync or async; an exception refuses; a
  verdict that arrives after its connection went, or that the core refuses, is logged, never fatal;
- the poison rule (DESIGN.md §4): the caller's mistake raises ``LocalProtocolError`` and changes
  nothing; any other failure inside the core stops the server (every socket aborted) and
  ``serve()`` re-raises it;
- the timer: ticks at the armed deadline when it fires a hair early (DESIGN.md §2);
- the log lines, and the application commands.

The adapter overrides the ``_`` methods in the "supplied by the adapter" section below.
"""

from __future__ import annotations

import inspect
import logging
from abc import abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from .._timer import EARLY_WAKE_SLACK, tick_time
from ..actions import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    OpenConnection,
    PauseReading,
    ResumeReading,
)
from ..config import BrokerConfig, ServerConfig
from ..describe import callable_name
from ..errors import ConfigError, LocalProtocolError
from ..events import Event
from ..notifications import (
    BrokerDown,
    BrokerGap,
    BrokerUp,
    HttpRequestAnswered,
    MessageReceived,
    Notification,
)
from ..wire.trace import FrameTracer
from . import TankServer
from .hooks import (
    HOOK_QUEUE_SIZE,
    HOOK_RAISED,
    Hook,
    SubscribeHook,
    hook_table,
)
from .stats import ServerStats
from .verdicts import SessionVerdicts

__all__ = ["EARLY_WAKE_SLACK", "SHUTDOWN_SLACK", "AuthHook", "ServerSession", "is_async"]

logger = logging.getLogger("tank")
broker_logger = logging.getLogger("tank.broker")
#: One info line per HTTP request answered (the access log).
http_logger = logging.getLogger("tank.http")
frame_logger = logging.getLogger("tank.frames")

#: ``authenticate(request)``: True accepts, False (or None) refuses with 401, an int with that status.
AuthHook = Callable[[Any], object]

#: ``shutdown()`` gives connections ``close_timeout`` plus this before aborting what is left (the
#: core itself aborts a connection ``close_timeout`` after its Close).
SHUTDOWN_SLACK = 0.5
#: How long queued coroutine hooks may run on at shutdown before they are dropped.
HOOK_DRAIN_TIMEOUT = 1.0

_TRANSPORT = (OpenConnection, AbortTransport, PauseReading, ResumeReading)


def is_async(fn: object) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one: its calls are awaited."""
    if inspect.iscoroutinefunction(fn):
        return True
    return callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def _wants_server(fn: object) -> bool:
    """A hook that takes two positional parameters gets ``(event, server)``."""
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        return True
    return len(positional) >= 2


class _HookCall:
    """One hook as the session calls it: inline or queued, with or without the server."""

    __slots__ = ("asynchronous", "fn", "with_server")

    def __init__(self, fn: Hook) -> None:
        self.fn: Callable[..., Any] = fn
        self.asynchronous = is_async(fn)
        self.with_server = _wants_server(fn)


class ServerSession(SessionVerdicts):
    """Everything a server adapter does that is not I/O (see the module header)."""

    def __init__(
        self,
        config: ServerConfig | None = None,
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
        if not isinstance(config, ServerConfig):
            raise ConfigError(f"config must be a tank_core.ServerConfig, got {config!r}")
        if redis_url is not None:
            config = replace(config, broker=BrokerConfig.from_url(redis_url))
        if authorize_subscribe is not None:
            config = replace(config, authorize_subscriptions=True)
        elif config.authorize_subscriptions:
            raise ConfigError(
                "config.authorize_subscriptions is set but serve() got no authorize_subscribe hook"
            )
        if authenticate is not None:
            config = replace(config, authenticate=True)
        elif config.authenticate:
            raise ConfigError("config.authenticate is set but serve() got no authenticate hook")
        if isinstance(hook_queue_size, bool) or not isinstance(hook_queue_size, int) or (
            hook_queue_size <= 0
        ):
            raise ConfigError(f"hook_queue_size must be an integer > 0, got {hook_queue_size!r}")
        self.config = config
        self._authenticate = authenticate
        self._authorize_subscribe = authorize_subscribe
        self._hook_table: dict[type, tuple[_HookCall, ...]] = {
            kind: tuple(_HookCall(fn) for fn in hooks)
            for kind, hooks in hook_table(
                on_connect=on_connect,
                on_disconnect=on_disconnect,
                on_message=on_message,
                on_error=on_error,
                on_event=on_event,
            ).items()
        }
        # No hook takes MessageReceived: the core need not make one per message.
        self._core = TankServer(
            config, message_notifications=MessageReceived in self._hook_table
        )
        self._hook_queue: deque[tuple[_HookCall | None, object]] = deque()
        self._hook_queue_size = hook_queue_size
        self._dropped = 0
        self._armed: float | None = None
        self._closing = False
        #: The failure that stopped the server (the poison rule), re-raised by ``serve()``.
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ supplied by the adapter

    @abstractmethod
    def _clock(self) -> float:
        """The adapter's monotonic clock (``trio.current_time()``, ``loop.time()``...)."""

    @abstractmethod
    def _wall(self) -> float:
        """Wall-clock seconds since the epoch: data copied into notifications."""

    @abstractmethod
    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        """Carry out one transport action, now."""

    @abstractmethod
    def _output_ready(self) -> None:
        """Sockets have bytes (or a close) waiting in the core: ``core.take_ready()`` names them,
        ``core.data_to_send`` takes their bytes. Called after every batch while the list is not
        empty: take it when the sockets can be written (asyncio: at the end of the loop turn, so
        that everything queued meanwhile leaves in one write; trio: wake their writers now)."""

    @abstractmethod
    def _turn_wanted(self) -> None:
        """The core wants ``_end_turn()`` called once the other sockets have had their turn
        (asyncio: in the next loop iteration; trio: after a checkpoint). Also check
        ``core.turn_wanted`` after taking bytes with ``data_to_send``: taking an HTTP answer can
        set it."""

    def _end_turn(self) -> None:
        """The loop turn the core asked for has passed: sockets that yielded read again."""
        self._call(lambda: self._core.end_turn(self._clock(), wall_time=self._wall()))

    @abstractmethod
    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job()`` as a background task of the server."""

    @abstractmethod
    def _hooks_waiting(self) -> None:
        """Coroutine hooks were queued: wake the task running ``_run_queued_hooks``."""

    @abstractmethod
    def _arm(self, deadline: float | None) -> None:
        """Move the one timer to ``deadline`` (None: never); it calls ``_timer_fired``. A timer
        that has fired counts as disarmed: it is armed again only if something is due later."""

    @abstractmethod
    def _abort_all(self) -> None:
        """The server failed: drop every socket and stop accepting, now."""

    # ------------------------------------------------------------------ the server object's API

    @property
    def core(self) -> TankServer:
        """The sans-IO server underneath (for tests and tools; do not drive it directly)."""
        return self._core

    @property
    def closing(self) -> bool:
        """True once shutdown (or a failure) has begun."""
        return self._closing or self.failure is not None

    @property
    def dropped_events(self) -> int:
        """Notifications dropped because coroutine hooks could not keep up."""
        return self._dropped

    def stats(self) -> ServerStats:
        """The counters behind ``/api/stats``."""
        return self._core.stats()

    def publish(self, topic: str, data: str) -> int:
        """``{"topic":T,"data":D}`` to each subscriber of ``topic``; returns how many."""
        return self._command("publish", lambda now, wall: self._core.publish(
            topic, data, now=now, wall_time=wall))

    def broadcast(self, data: str, exclude: int | None = None) -> int:
        """Raw text to every connection (but connection id ``exclude``); returns how many."""
        return self._command("broadcast", lambda now, wall: self._core.broadcast(
            data, exclude=exclude, now=now, wall_time=wall))

    def send(self, user_id: str, text: str) -> int:
        """Raw text to every connection of ``user_id``; returns how many."""
        return self._command("send", lambda now, wall: self._core.send_to_user(
            user_id, text, now=now, wall_time=wall))

    def disconnect(self, user_id: str) -> int:
        """Close every connection of ``user_id`` with 1000; returns how many."""
        return self._command("disconnect", lambda now, wall: self._core.disconnect_user(
            user_id, now=now, wall_time=wall))

    def presence(self, topic: str) -> list[tuple[int, str]]:
        """Who is subscribed to ``topic``: (connection id, user id) pairs. On one node only:
        ``LocalProtocolError`` on a cluster node (its peers' subscribers are theirs to say)."""
        if self.config.broker is not None:
            raise LocalProtocolError("presence(): not available on a cluster yet")
        if not isinstance(topic, str):
            raise LocalProtocolError(f"presence(): topic must be a str, got {type(topic).__name__}")
        return list(self._core.engine.presence(topic))

    def _command(
        self, what: str, call: Callable[[float, float], tuple[int, list[Action]]]
    ) -> int:
        if self.failure is not None:
            raise LocalProtocolError(
                f"{what}(): the server failed and stopped; see the chained exception"
            ) from self.failure
        if self._closing:
            raise LocalProtocolError(f"{what}(): the server is shutting down")
        if not self._started():
            raise LocalProtocolError(f"{what}(): the server is not running yet")
        try:
            count, actions = call(self._clock(), self._wall())
        except LocalProtocolError:
            raise  # the caller's mistake: nothing changed
        except Exception as exc:
            self._fail(exc)
            raise
        try:
            self._deliver(actions)
        except Exception as exc:
            self._fail(exc)
            raise
        return count

    def _started(self) -> bool:
        """Whether the adapter is serving (overridden by adapters that can be built unstarted)."""
        return True

    # ------------------------------------------------------------------ driving the core

    def _start_core(self) -> None:
        """Serving begins: tracing if logger ``tank.frames`` is at DEBUG; a cluster node's Redis
        connections are asked for."""
        if frame_logger.isEnabledFor(logging.DEBUG):
            self._core.tracer = FrameTracer(frame_logger.debug)
        self._call(lambda: self._core.start(now=self._clock(), wall_time=self._wall()))

    def _accept(self, peer_host: str, *, messages: bool = False) -> int | None:
        """A socket was accepted: its id, or None when the server has failed (close it).
        ``messages``: its transport frames WebSocket messages itself (``TankServer.accept``)."""
        if self.failure is not None:
            return None
        try:
            conn_id = self._core.accept(peer_host=peer_host, now=self._clock(), messages=messages)
        except Exception as exc:
            self._fail(exc)
            return None
        if self._core.output_waiting:
            self._output_ready()  # an answer before any request (limits.max_connections: 503)
        self._rearm()
        return conn_id

    def _event(self, event: Event) -> None:
        """Feed one transport event to the core and carry out what follows."""
        self._call(lambda: self._core.receive(event))

    def _timer_fired(self) -> None:
        """The one timer went off. Early by at most ``EARLY_WAKE_SLACK``: tick at the deadline
        it was armed for; earlier than that it was moved since (re-armed later): re-arm."""
        armed = self._armed
        self._armed = None
        if self.failure is not None:
            return
        now = tick_time(self._clock(), armed)
        if now is None:
            self._rearm()
            return
        self._call(lambda: self._core.tick(now, wall_time=self._wall()))

    def _call(self, call: Callable[[], list[Action]]) -> None:
        """One call into the core under the poison rule, then its actions carried out."""
        if self.failure is not None:
            return
        try:
            self._deliver(call())
        except Exception as exc:  # the core's, or the adapter's carrying out: a bug of ours
            self._fail(exc)

    def _deliver(self, actions: list[Action]) -> None:
        """Transport actions in order, then the sockets with output, then hooks and verdicts."""
        later: list[Action] | None = None
        for action in actions:
            if isinstance(action, _TRANSPORT):
                self._execute(action)
            elif later is None:
                later = [action]
            else:
                later.append(action)
        if self._core.output_waiting:
            self._output_ready()
        if self._core.turn_wanted:
            self._turn_wanted()
        if later is not None:
            for action in later:
                if isinstance(action, AuthorizeUpgrade):
                    self._authorize(action)
                elif isinstance(action, AuthorizeSubscription):
                    self._authorize_subscription(action)
                else:
                    self._notify(action)  # type: ignore[arg-type]  # the rest are notifications
        self._rearm()

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        if deadline != self._armed and self.failure is None:
            self._armed = deadline
            self._arm(deadline)

    def _fail(self, exc: BaseException) -> None:
        """The poison rule: a failure inside the core stops the server for good."""
        if self.failure is None:
            self.failure = exc
            logger.error("tank server failed; aborting every connection", exc_info=exc)
            self._abort_all()

    # ------------------------------------------------------------------ hooks

    def _notify(self, event: Notification) -> None:
        if isinstance(event, HttpRequestAnswered):
            http_logger.info(
                '%s "%s %s" %d', event.peer_host, event.method, event.target, event.status,
                extra={"event": "http", "conn_id": event.conn_id, "peer": event.peer_host,
                       "method": event.method, "target": event.target, "status": event.status},
            )
        elif isinstance(event, BrokerUp | BrokerDown | BrokerGap):
            _log_broker(event)
        for hook in self._hook_table.get(type(event), ()):
            if hook.asynchronous:
                self._enqueue(hook, event)
                continue
            try:
                result = hook.fn(event, self) if hook.with_server else hook.fn(event)
            except Exception:
                logger.exception(HOOK_RAISED, callable_name(hook.fn), type(event).__name__)
                continue
            if inspect.isawaitable(result):
                self._enqueue(None, result)

    def _enqueue(self, hook: _HookCall | None, item: object) -> None:
        if len(self._hook_queue) >= self._hook_queue_size:
            if self._dropped == 0:
                logger.warning("coroutine hooks cannot keep up: dropping events (dropped_events)")
            self._dropped += 1
            if inspect.iscoroutine(item):
                item.close()  # a dropped coroutine must not warn "never awaited"
            return
        self._hook_queue.append((hook, item))
        if len(self._hook_queue) == 1:
            self._hooks_waiting()

    @property
    def _hooks_queued(self) -> int:
        return len(self._hook_queue)

    async def _run_queued_hooks(self) -> None:
        """Await every queued coroutine hook, in order (the adapter's hook task calls this each
        time ``_hooks_waiting`` woke it)."""
        queue = self._hook_queue
        while queue:
            hook, item = queue.popleft()
            try:
                if hook is None:
                    await item  # type: ignore[misc]  # what a plain hook returned
                elif hook.with_server:
                    await hook.fn(item, self)
                else:
                    await hook.fn(item)
            except Exception:
                name = "hook" if hook is None else callable_name(hook.fn)
                logger.exception(HOOK_RAISED, name, type(item).__name__)

    def _drop_queued_hooks(self) -> None:
        """Shutdown ran out of time for them: what is left is dropped (and closed)."""
        while self._hook_queue:
            _hook, item = self._hook_queue.popleft()
            if inspect.iscoroutine(item):
                item.close()

    # ------------------------------------------------------------------ shutdown

    def _begin_shutdown(self) -> bool:
        """Shutdown's first step (the adapter has stopped accepting): goodbye, Close 1001, HTTP
        dropped, Redis left. False when it had begun already."""
        if self._closing:
            return False
        self._closing = True
        self._call(lambda: self._core.shutdown(now=self._clock(), wall_time=self._wall()))
        return True

    @property
    def _shutdown_grace(self) -> float:
        """How long shutdown waits for connections to finish before aborting the rest."""
        return self.config.close_timeout + SHUTDOWN_SLACK


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
