"""The engine's state and registry: connections by id and by user, topics, the deadline heap, and
the moves every part of the engine shares (subscribing, leaving, starting a close, forgetting).

``EngineState`` is the base of ``Engine`` (``engine.py``); ``delivery.py`` and ``liveness.py``
build on it. An optional ``InterestListener`` (the broker link) hears when a topic gains its first
subscriber or loses its last, and when a user id gains its first open connection or loses its last:
that is all a cluster needs to subscribe only what this node serves (DESIGN.md §5).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Protocol

from .._deadlines import Deadlines
from ..actions import (
    EngineAction,
    StartClose,
)
from ..config import ServerConfig
from ..errors import LocalProtocolError
from ..wire import close_codes
from ..wire.frames import frame_overhead
from .history_store import HistoryStore
from .output import OutboxAccount
from .stats import ServerStats
from .topics import TopicRegistry

__all__ = ["ConnectionRecord", "ConnectionState", "EngineState", "InterestListener", "encode_text"]



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


class ConnectionRecord:
    """What the engine knows of one connection (the ``OutboxAccount`` of its output lanes, too)."""

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
        "pending_recovery",
        "pending_topics",
        "ping_payload",
        "ping_sent_at",
        "pinged",
        "recovery",
        "rtt",
        "state",
        "user_id",
        "watched",
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
        #: Closed after ``heartbeat_timeout`` of silence. False for a connection whose transport
        #: keeps its Pongs to itself (ASGI) and whose client may never speak: its transport's
        #: own pings find it dead.
        self.watched = True
        #: Sent a Ping every interval. False when its transport keeps Pings to itself (ASGI):
        #: it still gets the text ``heartbeat``.
        self.pinged = True
        #: Agreed the recovery extension (``wire/recovery.py``): numbered publications, recover:.
        self.recovery = False
        #: Topic -> (epoch, offset) to replay from once ``authorize_subscriptions`` allows it.
        self.pending_recovery: dict[str, tuple[str | None, int | None]] | None = None


def encode_text(text: str, what: str) -> bytes:
    """``text`` as UTF-8, or ``LocalProtocolError`` naming ``what`` (not a str, lone surrogate)."""
    if not isinstance(text, str):
        raise LocalProtocolError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8: {exc.reason}") from None



class EngineState:
    """The engine's state; the engine's parts build on it."""

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
        history = self.config.history
        #: Each topic's recent publications (``ServerConfig.history``); None without history.
        self.history = None if history is None else HistoryStore(history, self._node_prefix)
        #: Connections that agreed the recovery extension (its frames are rendered only then).
        self._recovering = 0
        self._generated_ids = 0
        self._now = -float("inf")
        self._conns: dict[int, ConnectionRecord] = {}
        self._open: dict[int, ConnectionRecord] = {}
        self._by_user: dict[str, dict[int, ConnectionRecord]] = {}
        self._topics: TopicRegistry[ConnectionRecord] = TopicRegistry()
        self._deadlines = Deadlines()
        self._ping_counter = 0
        self._shutting_down = False
        # Counters behind /api/stats and /metrics.
        self.messages_in = 0
        self.messages_out = 0
        #: Limit name -> times it was met (``tank_core.Limits``; ``/metrics``).
        self.limit_hits: dict[str, int] = {}
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

    def check_registry(self) -> None:
        """Assert the topic registry's two directions agree and hold only open connections."""
        self._topics.check()
        for topic in self._topics:
            for conn_id in self._topics.subscribers(topic):
                assert conn_id in self._open, (topic, conn_id)

    def presence(self, topic: str) -> tuple[tuple[int, str], ...]:
        """Who is subscribed to ``topic`` on this node: (connection id, user id) pairs, in the
        order they subscribed."""
        return tuple((c.conn_id, c.user_id) for c in self._topics.subscribers(topic).values())

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

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float) -> float:
        # A `now` earlier than the last one counts as the last one (DESIGN.md §2).
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _require(self, conn_id: int) -> ConnectionRecord:
        conn = self._conns.get(conn_id)
        if conn is None:
            raise LocalProtocolError(f"no connection with id {conn_id}")
        return conn

    def _require_open(self, conn_id: int) -> ConnectionRecord:
        conn = self._require(conn_id)
        if conn.state is not ConnectionState.OPEN:
            raise LocalProtocolError(
                f"connection {conn_id} is closing; check is_open() before sending"
            )
        return conn

    def _subscribe(self, conn: ConnectionRecord, topic: str) -> bool:
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

    def _start_close(
        self,
        conn: ConnectionRecord,
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

    def _drop_user(self, conn: ConnectionRecord) -> None:
        same_user = self._by_user.get(conn.user_id)
        if same_user is not None:
            same_user.pop(conn.conn_id, None)
            if not same_user:
                del self._by_user[conn.user_id]
                if self._interest is not None:
                    self._interest.user_removed(conn.user_id)

    def _forget(self, conn: ConnectionRecord) -> None:
        conn_id = conn.conn_id
        if conn.state is ConnectionState.OPEN:
            self._leave_topics(conn_id)
            del self._open[conn_id]
            self._drop_user(conn)
        del self._conns[conn_id]
        if conn.recovery:
            self._recovering -= 1
        self._deadlines.discard(conn_id)
