"""Which application callbacks a client notification calls, in which order, with which arguments.

docs/client.md ("Callbacks", "Adapter contract") is the contract, the same for every client adapter.
``ClientDispatch.route(note)`` turns one notification of ``TankClient`` into a ``Routing``, and keeps
the little the notifications tell the adapter for later (the last error, whether any connection
opened) with the messages ``connect`` raises from them. It calls nothing and logs nothing:
``client_session.ClientSession`` carries a routing out, in this order, after the connection changes
and writes of the batch that produced it:

1. ``log``: one line for logger ``tank`` (``logger.log(level, message, *args)``), if any;
2. ``opened``: a connection opened: wake whoever waits for the first open;
3. ``final``: the client is closed for good: end the streams, wake ``wait_closed()``;
4. ``steps``, in order: ``Call(fn, args)``, an application callback to call (sync inline, async as
   a task, exceptions logged); ``Deliver(message)``, offer the message to
   the ``messages()`` streams its topic has **then** (``client_streams.TopicStreams.deliver``).

For one topic message the steps are the topic's callback, then its streams, then ``on_message``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .machine import ClientAction
from .notifications import (
    Closed,
    HeartbeatReceived,
    HeartbeatTimedOut,
    MessageArrived,
    Opened,
    Reconnecting,
    Recovered,
    Welcomed,
)

__all__ = [
    "CALLBACK_GRACE",
    "DEBUG",
    "INFO",
    "Call",
    "ClientCallbacks",
    "ClientDispatch",
    "Deliver",
    "LogLine",
    "OnClose",
    "OnHeartbeat",
    "OnHeartbeatTimeout",
    "OnMessage",
    "OnReconnect",
    "OnRecover",
    "Routing",
    "Step",
    "TopicCallback",
]

#: ``on_message(message)``: every message the server sends (docs/client.md).
OnMessage = Callable[[MessageArrived], object]
#: ``on_heartbeat()``: the server's text ``heartbeat`` arrived.
OnHeartbeat = Callable[[], object]
#: ``on_heartbeat_timeout(silent_for)``: nothing arrived for ``silent_for`` seconds.
OnHeartbeatTimeout = Callable[[float], object]
#: ``on_reconnect(attempt)``: a connection after the first one opened.
OnReconnect = Callable[[int], object]
#: ``on_close(code, reason)``: a connection (or a connection attempt) ended.
OnClose = Callable[[int, str], object]
#: ``on_recover(topic, complete)``: after a reconnect, whether all that ``topic`` missed was
#: replayed (False: reload your state).
OnRecover = Callable[[str, bool], object]
#: ``callback(data, message)`` of ``subscribe(topic, callback)``.
TopicCallback = Callable[[Any, MessageArrived], object]

#: Seconds ``close()`` waits for asynchronous callbacks still running before cancelling them.
CALLBACK_GRACE = 5.0

#: ``logging.DEBUG`` and ``logging.INFO`` (``logging`` itself is not imported: it pulls in threads).
DEBUG = 10
INFO = 20


@dataclass(frozen=True, slots=True)
class ClientCallbacks:
    """The application's callbacks given to ``connect`` (None: not wanted)."""

    on_message: OnMessage | None = None
    on_heartbeat: OnHeartbeat | None = None
    on_heartbeat_timeout: OnHeartbeatTimeout | None = None
    on_reconnect: OnReconnect | None = None
    on_close: OnClose | None = None
    on_recover: OnRecover | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """Call the application's ``fn(*args)``."""

    fn: Callable[..., object]
    args: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Deliver:
    """Offer ``message`` (a topic message) to the streams of its topic."""

    message: MessageArrived


Step = Call | Deliver


@dataclass(frozen=True, slots=True)
class LogLine:
    """``logger.log(level, message, *args)`` on logger ``tank``."""

    level: int
    message: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Routing:
    """What one notification asks of the adapter, in the order the fields are listed."""

    log: LogLine | None = None
    opened: bool = False
    final: bool = False
    steps: tuple[Step, ...] = ()


_NOTHING = Routing()


class ClientDispatch:
    """The application side of one client: its callbacks, its topic callbacks, and what the
    notifications said that the adapter needs later."""

    __slots__ = ("_heartbeat", "_topic_callbacks", "callbacks", "last_error", "opened_once", "url")

    def __init__(self, url: str, callbacks: ClientCallbacks) -> None:
        self.url = url
        self.callbacks = callbacks
        self._topic_callbacks: dict[str, TopicCallback] = {}
        #: Why the last connection (or attempt) ended; None while open and before any end.
        self.last_error: str | None = None
        #: A connection opened at least once.
        self.opened_once = False
        on_heartbeat = callbacks.on_heartbeat
        self._heartbeat = _NOTHING if on_heartbeat is None else Routing(steps=(Call(on_heartbeat),))

    # ------------------------------------------------------------------ topic callbacks

    def subscribed(self, topic: str, callback: TopicCallback | None) -> None:
        """``subscribe(topic, callback)``: a non-None callback replaces the topic's; None keeps it."""
        if callback is not None:
            self._topic_callbacks[topic] = callback

    def unsubscribed(self, topic: str) -> None:
        """``unsubscribe(topic)``: its callback is forgotten."""
        self._topic_callbacks.pop(topic, None)

    # ------------------------------------------------------------------ notifications

    def route(self, note: ClientAction) -> Routing:
        """What ``note`` asks of the adapter (nothing for ``LatencyMeasured``, read through
        ``latency``, and for the transport actions, which are not notifications)."""
        kind = type(note)
        if kind is MessageArrived:
            assert isinstance(note, MessageArrived)
            return Routing(steps=self._message_steps(note))
        if kind is HeartbeatReceived:
            return self._heartbeat
        if kind is Opened:
            assert isinstance(note, Opened)
            self.last_error = None
            self.opened_once = True
            on_reconnect = self.callbacks.on_reconnect
            return Routing(
                log=LogLine(DEBUG, "tank client: connected to %s", (self.url,)),
                opened=True,
                steps=(Call(on_reconnect, (note.attempt,)),)
                if note.reconnect and on_reconnect is not None
                else (),
            )
        if kind is HeartbeatTimedOut:
            assert isinstance(note, HeartbeatTimedOut)
            on_timeout = self.callbacks.on_heartbeat_timeout
            return Routing(
                log=LogLine(INFO, "tank client: nothing from %s for %.3f s", (self.url, note.silent_for)),
                steps=() if on_timeout is None else (Call(on_timeout, (note.silent_for,)),),
            )
        if kind is Closed:
            assert isinstance(note, Closed)
            self.last_error = note.reason or f"closed with code {note.code}"
            on_close = self.callbacks.on_close
            return Routing(
                final=note.final,
                steps=() if on_close is None else (Call(on_close, (note.code, note.reason)),),
            )
        if kind is Reconnecting:
            assert isinstance(note, Reconnecting)
            return Routing(
                log=LogLine(
                    INFO,
                    "tank client: %s: %s; attempt %d in %.3f s",
                    (self.url, self.last_error, note.attempt, note.delay),
                )
            )
        if kind is Recovered:
            assert isinstance(note, Recovered)
            on_recover = self.callbacks.on_recover
            # The outcome also goes into the topic's streams, in its place among the messages.
            marker = MessageArrived(text="", topic=note.topic, data=None, recovered=note.complete)
            steps: tuple[Step, ...] = (Deliver(marker),)
            if on_recover is not None:
                steps = (Call(on_recover, (note.topic, note.complete)), *steps)
            return Routing(
                log=None if note.complete else LogLine(
                    INFO, "tank client: %s: topic %r could not be recovered: reload it",
                    (self.url, note.topic),
                ),
                steps=steps,
            )
        if kind is Welcomed:
            assert isinstance(note, Welcomed)
            return Routing(log=LogLine(DEBUG, "tank client: welcomed as %r", (note.user_id,)))
        return _NOTHING

    def _message_steps(self, message: MessageArrived) -> tuple[Step, ...]:
        steps: list[Step] = []
        topic = message.topic
        if topic is not None:
            callback = self._topic_callbacks.get(topic)
            if callback is not None:
                steps.append(Call(callback, (message.data, message)))
            steps.append(Deliver(message))
        on_message = self.callbacks.on_message
        if on_message is not None:
            steps.append(Call(on_message, (message,)))
        return tuple(steps)

    # ------------------------------------------------------------------ entering ``connect``

    def cannot_connect(self) -> ConnectionError:
        """Entering with ``reconnect=False`` when the one attempt failed."""
        return ConnectionError(f"tank: cannot connect to {self.url}: {self.last_error}")

    def no_connection(self, connect_timeout: float) -> TimeoutError:
        """Entering with ``reconnect=True`` when nothing opened within ``connect_timeout``."""
        return TimeoutError(
            f"tank: no connection to {self.url} within {connect_timeout:g} s "
            f"(last error: {self.last_error or 'none'})"
        )
