"""The message-level engine: connections, topics, heartbeat, outbox accounting, one deadline heap.

It speaks in whole messages ("7 sent ``sub:news``", "ping 7", "close 7 with 1011") and never imports
wsproto, so any transport that carries WebSocket messages (sockets, ASGI, HTTP/2) can drive it. Time
enters as ``now`` and leaves as the pure ``next_deadline()``; every call returns its actions.

Heartbeat (PROTOCOL.md, "Our decisions"): every ``heartbeat_interval`` a Ping (and the text
``heartbeat``) goes to each open connection; one from which nothing has arrived for
``heartbeat_timeout`` is closed with 1011 ``heartbeat timeout``. Receiving never touches the heap:
it only sets ``last_seen``; when an entry fires, ``tick`` recomputes the real deadline and re-pushes it
if it still lies ahead (lazy extension, one heap operation per interval however busy the connection).

An optional ``InterestListener`` (the broker link) hears when a topic gains its first subscriber or
loses its last, and when a user id gains its first open connection or loses its last: that is all a
cluster needs to subscribe only what this node serves (DESIGN.md §5).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from typing import Protocol

from .._deadlines import Deadlines
from ..actions import (
    AbortTransport,
    AuthorizeSubscription,
    CloseTransport,
    EngineAction,
    SendPing,
    SendText,
    SendTextToEach,
    StartClose,
)
from ..config import ServerConfig
from ..errors import LocalProtocolError
from ..notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
    MessageReceived,
    SlowConsumerClosed,
    TopicSubscribed,
    TopicUnsubscribed,
)
from ..wire import close_codes
from ..wire.codec import (
    SHUTDOWN_TEXT,
    TEXT_HEARTBEAT,
    ClientHeartbeat,
    Relay,
    Subscribe,
    Unsubscribe,
    classify,
    hello,
    render_topic_message,
)
from ..wire.frames import frame_overhead
from .output import OutboxAccount
from .stats import ServerStats
from .topics import TopicRegistry

__all__ = ["ConnectionState", "Engine", "InterestListener", "encode_text"]


class InterestListener(Protocol):
    """Hears the edges of local interest (the broker link); called during engine calls."""

    def topic_added(self, topic: str) -> None: ...
    def topic_removed(self, topic: str) -> None: ...
    def user_added(self, user_id: str) -> None: ...
    def user_removed(self, user_id: str) -> None: ...


class ConnectionState(enum.Enum):
    #: Exchanging messages.
    OPEN = "open"
    #: We sent a Close and wait, at most ``close_timeout``, for the peer's.
    CLOSING = "closing"


class _Connection:
    __slots__ = (
        "close_code",
        "close_reason",
        "conn_id",
        "grace_seen",
        "grace_until",
        "last_seen",
        "next_ping",
        "outbox",
        "peer_host",
        "pending_topics",
        "ping_payload",
        "ping_sent_at",
        "rtt",
        "state",
        "user_id",
    )

    def __init__(self, conn_id: int, user_id: str, peer_host: str, now: float, interval: float):
        self.conn_id = conn_id
        self.user_id = user_id
        self.peer_host = peer_host
        self.state = ConnectionState.OPEN
        self.last_seen = now
        self.next_ping = now + interval
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        self.rtt: float | None = None
        self.outbox = 0
        self.grace_until: float | None = None
        self.grace_seen = 0.0
        #: Topics asked for while ``authorize_subscriptions`` waits for the application.
        self.pending_topics: set[str] | None = None
        self.close_code = close_codes.ABNORMAL
        self.close_reason = ""


def encode_text(text: str, what: str) -> bytes:
    """``text`` as UTF-8, or ``LocalProtocolError`` naming ``what`` (not a str, lone surrogate)."""
    if not isinstance(text, str):
        raise LocalProtocolError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8: {exc.reason}") from None


_utf8 = encode_text


class Engine:
    """Every open connection of one server process, and what happens between them.

    Connection ids are chosen by the caller (the byte-level server or another transport); user ids
    are data. Application commands on unknown or closing connections raise ``LocalProtocolError``;
    network events for them (a race with a close) are ignored.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        rng: random.Random | None = None,
        overhead: Callable[[int], int] = frame_overhead,
        interest: InterestListener | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self._interest = interest
        self._rng = rng if rng is not None else random.Random()
        self._overhead = overhead
        self._node_prefix = f"{self._rng.getrandbits(32):08x}"
        self._generated_ids = 0
        self._now = -float("inf")
        self._conns: dict[int, _Connection] = {}
        self._open: dict[int, _Connection] = {}
        self._by_user: dict[str, dict[int, _Connection]] = {}
        self._topics: TopicRegistry[_Connection] = TopicRegistry()
        self._deadlines = Deadlines()
        self._ping_counter = 0
        self._shutting_down = False
        # Counters behind /api/stats and /metrics.
        self.messages_in = 0
        self.messages_out = 0
        self.pings_sent = 0
        self.pongs_received = 0
        self.heartbeat_timeouts = 0
        self.slow_consumer_closes = 0
        self.connections_total = 0
        # A tick later than this after an entry's due time is our stall, not the peer's silence.
        self._stall = min(1.0, self.config.heartbeat_interval / 2)
        # Pings due within this window are sent by the tick at hand, so connections with nearby
        # phases share one timer wake-up (idle CPU); deaths and close timeouts are never early.
        self.ping_window = min(0.05, self.config.heartbeat_interval / 20)

    # ------------------------------------------------------------------ queries

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work to do, on the caller's clock; None when never. Pure."""
        return self._deadlines.earliest()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def connection_count(self) -> int:
        """Connections not yet forgotten (open and closing)."""
        return len(self._conns)

    def is_open(self, conn_id: int) -> bool:
        return conn_id in self._open

    def state_of(self, conn_id: int) -> ConnectionState | None:
        conn = self._conns.get(conn_id)
        return None if conn is None else conn.state

    def user_of(self, conn_id: int) -> str:
        return self._require(conn_id).user_id

    def topics_of(self, conn_id: int) -> frozenset[str]:
        return self._topics.topics_of(conn_id)

    def subscribers_of(self, topic: str) -> tuple[int, ...]:
        return tuple(self._topics.subscribers(topic))

    def connections_of(self, user_id: str) -> tuple[int, ...]:
        return tuple(self._by_user.get(user_id, ()))

    def open_connections(self) -> tuple[int, ...]:
        return tuple(self._open)

    def outbox_of(self, conn_id: int) -> int:
        return self._require(conn_id).outbox

    def outbox_account(self, conn_id: int) -> OutboxAccount:
        """The record whose ``outbox`` counts ``conn_id``'s unsent bytes: the byte-level server
        counts taken bytes off it directly (its output hot path)."""
        return self._require(conn_id)

    def rtt_of(self, conn_id: int) -> float | None:
        return self._require(conn_id).rtt

    def last_seen_of(self, conn_id: int) -> float:
        return self._require(conn_id).last_seen

    def scheduled_deadlines(self) -> dict[int, float]:
        """Each connection's registered deadline (for oracles in tests)."""
        return dict(self._deadlines.items())

    def due_time(self, conn_id: int) -> float:
        """When the connection really needs service, recomputed from its state (for oracles)."""
        conn = self._require(conn_id)
        registered = self._deadlines.get(conn_id)
        if conn.state is ConnectionState.CLOSING:
            assert registered is not None
            return registered
        return self._open_deadline(conn)

    def check_registry(self) -> None:
        """Assert the topic registry's two directions agree and hold only open connections."""
        self._topics.check()
        for topic in self._topics:
            for conn_id in self._topics.subscribers(topic):
                assert conn_id in self._open, (topic, conn_id)

    def stats(self) -> ServerStats:
        return ServerStats(
            connections=len(self._open),
            topics=self._topics.counts(),
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            pings_sent=self.pings_sent,
            pongs_received=self.pongs_received,
            heartbeat_timeouts=self.heartbeat_timeouts,
            slow_consumer_closes=self.slow_consumer_closes,
            connections_total=self.connections_total,
            outbox_bytes=sum(c.outbox for c in self._conns.values()),
            rtt={c.conn_id: c.rtt for c in self._open.values() if c.rtt is not None},
            shutting_down=self._shutting_down,
        )

    # ------------------------------------------------------------------ connection lifecycle

    def generate_user_id(self) -> str:
        """A fresh id for a client that brought none: a random node prefix plus a counter."""
        self._generated_ids += 1
        return f"client_{self._node_prefix}{self._generated_ids}"

    def open(
        self, conn_id: int, *, user_id: str, peer_host: str, now: float, wall_time: float
    ) -> list[EngineAction]:
        """A WebSocket connection was established: queue the Hello frame and start its heartbeat."""
        now = self._advance(now)
        if self._shutting_down:
            raise LocalProtocolError("the server is shutting down: refuse new connections instead")
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection id {conn_id} is already in use")
        if not isinstance(user_id, str):
            raise LocalProtocolError(f"user_id must be a str, got {type(user_id).__name__}")
        conn = _Connection(conn_id, user_id, peer_host, now, self.config.heartbeat_interval)
        self._conns[conn_id] = conn
        self._open[conn_id] = conn
        same_user = self._by_user.get(user_id)
        if same_user is None:
            same_user = self._by_user[user_id] = {}
            if self._interest is not None:
                self._interest.user_added(user_id)
        same_user[conn_id] = conn
        self.connections_total += 1
        self._deadlines.set(conn_id, self._open_deadline(conn))
        actions: list[EngineAction] = []
        # PROTOCOL.md [ref]: the Hello frame is the first frame on every connection.
        self._send_one(conn, hello(user_id), actions, wall_time, force=True)
        actions.append(
            ClientConnected(
                conn_id=conn_id, user_id=user_id, peer_host=peer_host, wall_time=wall_time
            )
        )
        return actions

    def touch(self, conn_id: int, now: float) -> None:
        """Bytes arrived from ``conn_id``: a sign of life (any frame, even half of one)."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            now = self._advance(now)
            conn.last_seen = now

    def message_received(
        self, conn_id: int, payload: bytes, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """A complete data message (valid UTF-8) arrived from ``conn_id``."""
        conn = self._open.get(conn_id)
        if conn is None:
            return []  # closing or gone: PROTOCOL.md allows ignoring data after our Close
        conn.last_seen = self._advance(now)
        self.messages_in += 1
        match classify(payload):
            case ClientHeartbeat():
                return []
            case Subscribe(topic=topic):
                if self.config.authorize_subscriptions:
                    return self._ask_subscription(conn, topic)
                if self._subscribe(conn, topic):
                    return [
                        TopicSubscribed(
                            conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time
                        )
                    ]
                return []  # PROTOCOL.md [must]: repeated sub: is idempotent
            case Unsubscribe(topic=topic):
                if conn.pending_topics is not None:
                    conn.pending_topics.discard(topic)  # the later verdict is then ignored
                if self._topics.unsubscribe(conn_id, topic):
                    if self._interest is not None and not self._topics.subscribers(topic):
                        self._interest.topic_removed(topic)
                    return [
                        TopicUnsubscribed(
                            conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time
                        )
                    ]
                return []  # PROTOCOL.md [must]: unknown unsubscribes are no-ops
            case Relay():
                actions: list[EngineAction] = [
                    MessageReceived(
                        conn_id=conn_id, user_id=conn.user_id, data=payload, wall_time=wall_time
                    )
                ]
                if self.config.relay:
                    # PROTOCOL.md case 4 [ref]: to every other connected client, never the sender.
                    others = (c for c in self._open.values() if c is not conn)
                    self._fan_out(payload, others, actions, wall_time)
                return actions

    def _ask_subscription(self, conn: _Connection, topic: str) -> list[EngineAction]:
        if conn.conn_id in self._topics.subscribers(topic):
            return []  # already subscribed: repeats stay idempotent, no second question
        pending = conn.pending_topics
        if pending is None:
            pending = conn.pending_topics = set()
        elif topic in pending:
            return []
        pending.add(topic)
        return [AuthorizeSubscription(conn_id=conn.conn_id, user_id=conn.user_id, topic=topic)]

    def subscription_verdict(
        self, conn_id: int, topic: str, allowed: bool, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The application's answer to ``AuthorizeSubscription``. A verdict for a connection that
        has gone, or for a topic it has unsubscribed from meanwhile, is ignored."""
        self._advance(now)
        conn = self._open.get(conn_id)
        if conn is None or conn.pending_topics is None or topic not in conn.pending_topics:
            return []
        conn.pending_topics.discard(topic)
        if not conn.pending_topics:
            conn.pending_topics = None
        if not allowed:
            return []  # PROTOCOL.md: the reference never answers subscriptions on the wire
        self._subscribe(conn, topic)
        return [
            TopicSubscribed(conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time)
        ]

    def pong_received(self, conn_id: int, payload: bytes, *, now: float) -> None:
        """A Pong arrived; when it answers our latest Ping it gives a round-trip time sample."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        now = self._advance(now)
        conn.last_seen = now
        self.pongs_received += 1
        if conn.ping_payload is not None and payload == conn.ping_payload:
            conn.rtt = now - conn.ping_sent_at
            conn.ping_payload = None

    def close_received(
        self, conn_id: int, code: int | None, reason: str, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The peer's Close arrived (``code`` None for an empty body, i.e. 1005)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        now = self._advance(now)
        actions: list[EngineAction] = []
        if conn.state is ConnectionState.OPEN:
            # PROTOCOL.md [ref]: answer with a Close carrying the same code, then close TCP
            # (RFC 6455 §7.1.1: the server closes the TCP connection first).
            self._start_close(conn, code, "", False, now, actions)
            ended_code = close_codes.NO_STATUS if code is None else code
            ended_reason = reason
        else:
            ended_code, ended_reason = conn.close_code, conn.close_reason
        actions.append(CloseTransport(conn_id=conn_id))
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id,
                user_id=conn.user_id,
                code=ended_code,
                reason=ended_reason,
                wall_time=wall_time,
            )
        )
        return actions

    def protocol_failed(
        self, conn_id: int, code: int, reason: str, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The peer broke the protocol (1002, 1007, 1009): Fail the WebSocket Connection.

        RFC 6455 §7.1.7: send a Close with the code, then close the TCP connection.
        """
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        now = self._advance(now)
        actions: list[EngineAction] = [
            ErrorOccurred(
                code=ErrorCode.READ_ERROR,
                message=f"protocol error ({code}): {reason}",
                conn_id=conn_id,
                user_id=conn.user_id,
                wall_time=wall_time,
            )
        ]
        if conn.state is ConnectionState.OPEN:
            self._start_close(conn, code, reason, True, now, actions)
        actions.append(CloseTransport(conn_id=conn_id))
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id,
                user_id=conn.user_id,
                code=conn.close_code,
                reason=conn.close_reason,
                wall_time=wall_time,
            )
        )
        return actions

    def transport_closed(
        self,
        conn_id: int,
        *,
        now: float,
        wall_time: float,
        error: str | None = None,
        write_failed: bool = False,
    ) -> list[EngineAction]:
        """The transport is gone (EOF, reset, write failure)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []  # our own close completing, or a race
        self._advance(now)
        actions: list[EngineAction] = []
        if conn.state is ConnectionState.OPEN:
            code, reason = close_codes.ABNORMAL, error or "connection lost"
            if error is not None:
                actions.append(
                    ErrorOccurred(
                        code=ErrorCode.WRITE_ERROR if write_failed else ErrorCode.READ_ERROR,
                        message=error,
                        conn_id=conn_id,
                        user_id=conn.user_id,
                        wall_time=wall_time,
                    )
                )
        else:
            code, reason = conn.close_code, conn.close_reason
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id, user_id=conn.user_id, code=code, reason=reason, wall_time=wall_time
            )
        )
        return actions

    def flushed(self, conn_id: int, nbytes: int) -> None:
        """The transport wrote ``nbytes`` of ``conn_id``'s queued data messages."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            left = conn.outbox - nbytes
            conn.outbox = left if left > 0 else 0

    def flushed_each(self, conn_ids: Iterable[int], nbytes: int) -> None:
        """The transport wrote ``nbytes`` for each of ``conn_ids`` (a fan-out handed over at once)."""
        conns = self._conns
        for conn_id in conn_ids:
            conn = conns.get(conn_id)
            if conn is not None:
                left = conn.outbox - nbytes
                conn.outbox = left if left > 0 else 0

    # ------------------------------------------------------------------ application commands

    def publish(
        self, topic: str, data: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``{"topic":T,"data":D}`` to every subscriber of ``topic``; returns how many."""
        return self.publish_rendered(topic, self.render_publish(topic, data), now=now,
                                     wall_time=wall_time)

    @staticmethod
    def render_publish(topic: str, data: str) -> bytes:
        """The text ``publish`` sends (``LocalProtocolError`` unless both are str)."""
        if not isinstance(topic, str):
            raise LocalProtocolError(f"topic must be a str, got {type(topic).__name__}")
        if not isinstance(data, str):
            raise LocalProtocolError(f"data must be a str, got {type(data).__name__}")
        return render_topic_message(topic, data)

    def publish_rendered(
        self, topic: str, payload: bytes, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``publish`` with the envelope already rendered (encode once, e.g. by a broker)."""
        self._advance(now)
        subscribers = self._topics.subscribers(topic)
        if not subscribers:
            return 0, []
        actions: list[EngineAction] = []
        delivered = self._fan_out(payload, subscribers.values(), actions, wall_time)
        return delivered, actions

    def broadcast(
        self, text: str, *, exclude: int | None = None, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``text`` to every open connection (but ``exclude``); returns how many."""
        return self.broadcast_rendered(
            _utf8(text, "broadcast text"), exclude=exclude, now=now, wall_time=wall_time
        )

    def broadcast_rendered(
        self, payload: bytes, *, exclude: int | None = None, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``broadcast`` with the text already UTF-8 (from another node, say)."""
        self._advance(now)
        actions: list[EngineAction] = []
        recipients: Iterable[_Connection] = self._open.values()
        if exclude is not None:
            recipients = (c for c in self._open.values() if c.conn_id != exclude)
        delivered = self._fan_out(payload, recipients, actions, wall_time)
        return delivered, actions

    def send(self, conn_id: int, text: str, *, now: float, wall_time: float) -> list[EngineAction]:
        """Send ``text`` to one open connection."""
        payload = _utf8(text, "text")
        conn = self._require_open(conn_id)
        self._advance(now)
        actions: list[EngineAction] = []
        self._send_one(conn, payload, actions, wall_time)
        return actions

    def send_to_user(
        self, user_id: str, text: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``text`` to every open connection of ``user_id``; returns how many."""
        return self.send_to_user_rendered(
            user_id, _utf8(text, "text"), now=now, wall_time=wall_time
        )

    def send_to_user_rendered(
        self, user_id: str, payload: bytes, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``send_to_user`` with the text already UTF-8."""
        self._advance(now)
        actions: list[EngineAction] = []
        conns = list(self._by_user.get(user_id, {}).values())
        delivered = self._fan_out(payload, conns, actions, wall_time)
        return delivered, actions

    def close(
        self,
        conn_id: int,
        code: int = close_codes.NORMAL,
        reason: str = "",
        *,
        now: float,
        wall_time: float,
    ) -> list[EngineAction]:
        """Close one open connection; queued data is sent first (PROTOCOL.md: operator close 1000)."""
        close_codes.validate_close_code(code)
        if len(_utf8(reason, "reason")) > 123:
            raise LocalProtocolError("a close reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5)")
        conn = self._require_open(conn_id)
        now = self._advance(now)
        actions: list[EngineAction] = []
        self._start_close(conn, code, reason, False, now, actions)
        return actions

    def disconnect_user(
        self, user_id: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Close every open connection of ``user_id`` with 1000; returns how many."""
        now = self._advance(now)
        actions: list[EngineAction] = []
        conns = list(self._by_user.get(user_id, {}).values())
        for conn in conns:
            self._start_close(conn, close_codes.NORMAL, "", False, now, actions)
        return len(conns), actions

    def shutdown(self, *, now: float, wall_time: float) -> list[EngineAction]:
        """Graceful shutdown (PROTOCOL.md): ``Server is shutting down`` to every client, then
        Close 1001 behind any pending output; ``close_timeout`` later, stragglers are dropped."""
        now = self._advance(now)
        self._shutting_down = True
        actions: list[EngineAction] = []
        for conn in list(self._open.values()):
            self._send_one(conn, SHUTDOWN_TEXT, actions, wall_time, force=True)
            self._start_close(conn, close_codes.GOING_AWAY, "server shutdown", False, now, actions)
        return actions

    # ------------------------------------------------------------------ time

    def tick(self, now: float, *, wall_time: float) -> list[EngineAction]:
        """Service everything due by ``now``: pings, heartbeat timeouts, close timeouts.

        Idempotent for the same ``now``; afterwards ``next_deadline()`` is None or later than now.
        """
        now = self._advance(now)
        actions: list[EngineAction] = []
        timeout = self.config.heartbeat_timeout
        # One Ping payload per tick and one shared text-heartbeat frame: framed once for all.
        ping_payload: bytes | None = None
        heartbeat_to: list[_Connection] = []
        ping_by = now + self.ping_window
        for conn_id, due in self._deadlines.pop_due(ping_by):
            conn = self._conns[conn_id]
            if due > now and conn.state is ConnectionState.CLOSING:
                self._deadlines.set(conn_id, due)  # popped with the ping window: not yet due
                continue
            if conn.state is ConnectionState.CLOSING:
                # The peer never answered our Close within close_timeout: drop TCP.
                actions.append(AbortTransport(conn_id=conn_id))
                self._forget(conn)
                actions.append(
                    ClientDisconnected(
                        conn_id=conn_id,
                        user_id=conn.user_id,
                        code=conn.close_code,
                        reason=conn.close_reason,
                        wall_time=wall_time,
                    )
                )
                continue
            silent_for = now - conn.last_seen
            # The same sum as _open_deadline: `now - last_seen` may round below the timeout.
            # A grace counts only for the silence it was given for (the same last_seen).
            grace = conn.grace_until if conn.grace_seen == conn.last_seen else None
            if now < conn.last_seen + timeout:
                conn.grace_until = None
            elif grace is None and now - due > self._stall:
                # We woke far too late (a blocked loop, a long GC): the peer's bytes may sit
                # unread in the kernel. Give readers a short grace before blaming the peer.
                conn.grace_until = now + self._stall
                conn.grace_seen = conn.last_seen
            elif grace is None or now >= grace:
                self._heartbeat_timeout(conn, silent_for, now, actions, wall_time)
                continue
            if ping_by >= conn.next_ping:
                if ping_payload is None:
                    self._ping_counter += 1
                    ping_payload = self._ping_counter.to_bytes(8, "big")
                self._ping(conn, ping_payload, now, actions)
                heartbeat_to.append(conn)
            self._deadlines.set(conn_id, self._open_deadline(conn))
        if heartbeat_to and self.config.text_heartbeat:
            # PROTOCOL.md [ref]: the text `heartbeat` every interval; a connection too far behind
            # to take it is a slow consumer like any other.
            self._fan_out(TEXT_HEARTBEAT, heartbeat_to, actions, wall_time)
        return actions

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float) -> float:
        # A `now` earlier than the last one counts as the last one (DESIGN.md §2).
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _require(self, conn_id: int) -> _Connection:
        conn = self._conns.get(conn_id)
        if conn is None:
            raise LocalProtocolError(f"no connection with id {conn_id}")
        return conn

    def _require_open(self, conn_id: int) -> _Connection:
        conn = self._require(conn_id)
        if conn.state is not ConnectionState.OPEN:
            raise LocalProtocolError(
                f"connection {conn_id} is closing; check is_open() before sending"
            )
        return conn

    def _subscribe(self, conn: _Connection, topic: str) -> bool:
        interest = self._interest
        first = interest is not None and not self._topics.subscribers(topic)
        added = self._topics.subscribe(conn.conn_id, conn, topic)
        if first and interest is not None:
            interest.topic_added(topic)
        return added

    def _leave_topics(self, conn_id: int) -> None:
        left = self._topics.remove_connection(conn_id)
        interest = self._interest
        if interest is not None:
            for topic in left:
                if not self._topics.subscribers(topic):
                    interest.topic_removed(topic)

    def _open_deadline(self, conn: _Connection) -> float:
        death = conn.last_seen + self.config.heartbeat_timeout
        if conn.grace_until is not None and conn.grace_seen == conn.last_seen:
            death = max(death, conn.grace_until)
        return min(conn.next_ping, death)

    def _ping(
        self, conn: _Connection, payload: bytes, now: float, actions: list[EngineAction]
    ) -> None:
        conn.ping_payload = payload
        conn.ping_sent_at = now
        self.pings_sent += 1
        actions.append(SendPing(conn_id=conn.conn_id, payload=payload))
        interval = self.config.heartbeat_interval
        conn.next_ping += interval
        if conn.next_ping <= now + self.ping_window:
            conn.next_ping = now + interval  # after a stall: one ping, not a burst

    def _heartbeat_timeout(
        self,
        conn: _Connection,
        silent_for: float,
        now: float,
        actions: list[EngineAction],
        wall_time: float,
    ) -> None:
        self.heartbeat_timeouts += 1
        actions.append(
            HeartbeatTimedOut(
                conn_id=conn.conn_id, user_id=conn.user_id, silent_for=silent_for,
                wall_time=wall_time,
            )
        )
        actions.append(
            ErrorOccurred(
                code=ErrorCode.HEARTBEAT_FAILED,
                message=f"heartbeat timeout: nothing received for {silent_for:.3f} s",
                conn_id=conn.conn_id,
                user_id=conn.user_id,
                wall_time=wall_time,
            )
        )
        self._start_close(conn, close_codes.INTERNAL_ERROR, "heartbeat timeout", True, now, actions)

    def _send_one(
        self,
        conn: _Connection,
        payload: bytes,
        actions: list[EngineAction],
        wall_time: float,
        *,
        force: bool = False,
    ) -> None:
        size = len(payload) + self._overhead(len(payload))
        if not force and conn.outbox + size > self.config.max_outbox_bytes:
            self._slow_consumer(conn, actions, wall_time)
            return
        conn.outbox += size
        self.messages_out += 1
        actions.append(SendText(conn_id=conn.conn_id, payload=payload))

    def _fan_out(
        self,
        payload: bytes,
        recipients: Iterable[_Connection],
        actions: list[EngineAction],
        wall_time: float,
    ) -> int:
        """Queue ``payload`` to each recipient that can take it; close those that cannot."""
        size = len(payload) + self._overhead(len(payload))
        room = self.config.max_outbox_bytes - size
        targets: list[int] = []
        slow: list[_Connection] = []
        for conn in recipients:
            if conn.outbox > room:
                slow.append(conn)
            else:
                conn.outbox += size
                targets.append(conn.conn_id)
        if targets:
            self.messages_out += len(targets)
            actions.append(SendTextToEach(conn_ids=tuple(targets), payload=payload))
        for conn in slow:
            self._slow_consumer(conn, actions, wall_time)
        return len(targets)

    def _slow_consumer(
        self, conn: _Connection, actions: list[EngineAction], wall_time: float
    ) -> None:
        # PROTOCOL.md, Limits: close 1008 "slow consumer"; the others are not delayed.
        self.slow_consumer_closes += 1
        actions.append(
            SlowConsumerClosed(
                conn_id=conn.conn_id, user_id=conn.user_id, outbox_bytes=conn.outbox,
                wall_time=wall_time,
            )
        )
        self._start_close(
            conn, close_codes.POLICY_VIOLATION, "slow consumer", True, self._now, actions
        )

    def _start_close(
        self,
        conn: _Connection,
        code: int | None,
        reason: str,
        discard_pending: bool,
        now: float,
        actions: list[EngineAction],
    ) -> None:
        """Move an open connection to CLOSING: no data message may follow (RFC 6455 §5.5.1)."""
        conn_id = conn.conn_id
        self._leave_topics(conn_id)
        del self._open[conn_id]
        self._drop_user(conn)
        conn.state = ConnectionState.CLOSING
        conn.close_code = close_codes.NO_STATUS if code is None else code
        conn.close_reason = reason
        if discard_pending:
            conn.outbox = 0
        body = 0 if code is None else 2 + len(reason.encode())
        conn.outbox += 2 + body
        actions.append(
            StartClose(conn_id=conn_id, code=code, reason=reason, discard_pending=discard_pending)
        )
        self._deadlines.set(conn_id, now + self.config.close_timeout)

    def _drop_user(self, conn: _Connection) -> None:
        same_user = self._by_user.get(conn.user_id)
        if same_user is not None:
            same_user.pop(conn.conn_id, None)
            if not same_user:
                del self._by_user[conn.user_id]
                if self._interest is not None:
                    self._interest.user_removed(conn.user_id)

    def _forget(self, conn: _Connection) -> None:
        conn_id = conn.conn_id
        if conn.state is ConnectionState.OPEN:
            self._leave_topics(conn_id)
            del self._open[conn_id]
            self._drop_user(conn)
        del self._conns[conn_id]
        self._deadlines.discard(conn_id)
