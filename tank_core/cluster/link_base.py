"""The broker link's state: its constants, its two Redis connections, what it keeps for the other
nodes, and the queries on it. ``BrokerLink`` (``link.py``) is built on it with ``interest.py``
(subscriptions and what arrives on them) and ``publishing.py`` (what this node sends, and the
membership count that judges each answer).
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from ..config import BrokerConfig
from ..errors import LocalProtocolError
from ..notifications import BrokerDown, BrokerGap, BrokerUp
from .envelope import (
    BROADCAST,
    DISCONNECT,
    LEAVE,
    PUBLISH,
    RELAY,
    SEND,
    Channels,
)
from .resp import RespParser, encode_command
from .vocabulary import BrokerClose, BrokerConnect, BrokerRole

__all__ = [
    "DOWN",
    "PARTIAL",
    "PUB",
    "SUB",
    "UP",
    "ConnStatus",
    "Inbound",
    "LinkBase",
    "LinkOutput",
    "LinkState",
    "PendingCommand",
    "RedisConnection",
]

#: Channels per SUBSCRIBE / UNSUBSCRIBE command.
SUBSCRIBE_BATCH = 512
#: Bytes of PUBLISH commands written and not yet answered, beside ``max_in_flight``.
MAX_IN_FLIGHT_BYTES = 8 * 1_048_576
#: Outbound sequence counters kept before starting afresh under a new origin id.
MAX_SEQUENCE_CHANNELS = 100_000
#: Origins remembered per channel for gap and duplicate checks.
MAX_ORIGINS_PER_CHANNEL = 256
#: Seconds between membership queries while nodes known before are missing.
MEMBERSHIP_POLL = 0.05

#: What a publish achieved: Redis took it and every known node heard it; Redis took it but nodes
#: known before have not come back yet; Redis did not take it (other nodes not reached).
UP, PARTIAL, DOWN = "up", "partial", "down"

SUB = BrokerRole.SUBSCRIBER
PUB = BrokerRole.PUBLISHER

CHANNEL_TOPIC = b"t"
CHANNEL_USER = b"u"
CHANNEL_ALL = b"a"
#: Which envelope kinds may arrive on which kind of channel.
ALLOWED_KINDS = {
    CHANNEL_TOPIC: (PUBLISH,),
    CHANNEL_USER: (SEND, DISCONNECT),
    CHANNEL_ALL: (BROADCAST, RELAY, LEAVE),
}

# What a reply on the publishing connection answers.
REPLY_PUBLISH, REPLY_HANDSHAKE, REPLY_NUMSUB = 0, 1, 2


class LinkState(enum.Enum):
    #: ``start()`` not called yet.
    IDLE = "idle"
    #: Opening both connections, authenticating, subscribing every wanted channel.
    CONNECTING = "connecting"
    #: Messages flow both ways.
    UP = "up"
    #: Waiting out the backoff delay before the next attempt.
    DOWN = "down"
    #: Stopped for good (server shutdown).
    CLOSED = "closed"


class ConnStatus(enum.Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"


@dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """A message from another node for this node's connections: ``kind`` is an envelope kind,
    ``key`` the topic (publish) or user id (send, disconnect), ``payload`` the text to deliver."""

    kind: bytes
    key: str
    payload: bytes


LinkOutput = BrokerConnect | BrokerClose | BrokerUp | BrokerDown | BrokerGap | Inbound


class PendingCommand:
    """One command on the publishing connection, kept until Redis answers it; a PUBLISH not
    answered before a reconnect is sent again."""

    __slots__ = ("command", "kind", "sent_at", "token")

    def __init__(self, command: bytes, token: int | None, kind: int = REPLY_PUBLISH) -> None:
        self.command = command
        self.token = token
        self.kind = kind
        self.sent_at = 0.0


class RedisConnection:
    __slots__ = ("out", "parser", "role", "status")

    def __init__(self, role: BrokerRole) -> None:
        self.role = role
        self.status = ConnStatus.CLOSED
        self.parser: RespParser | None = None
        self.out: list[bytes] = []

class LinkBase:
    """The state of a broker link (see ``link.py``)."""

    def __init__(self, config: BrokerConfig, *, rng: random.Random | None = None) -> None:
        RespParser()  # fail now, with the extra to install, if hiredis is missing
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self.channels = Channels(config.prefix)
        #: This node's id in envelopes; a new epoch suffix when the sequence table is reset.
        self.node_id = f"{self._rng.getrandbits(64):016x}"
        self._epoch = 0
        self._origin = self.node_id.encode()
        #: Every origin of this node starts so, whatever its epoch (see _new_epoch).
        self._own_prefix = self.node_id.encode()
        self.state = LinkState.IDLE
        self.generation = 0
        self._now = -float("inf")
        self._sub = RedisConnection(SUB)
        self._pub = RedisConnection(PUB)
        # Channel -> (channel kind, topic or user id). {prefix}:all is always wanted.
        self._want: dict[bytes, tuple[bytes, str]] = {self.channels.all: (CHANNEL_ALL, "")}
        self._pending_sub: dict[bytes, None] = {}
        self._pending_unsub: dict[bytes, None] = {}
        self._awaiting_confirm: set[bytes] = set()
        self._sub_handshake = 0
        # Publisher: replies expected in order (None: a handshake command), and the queue of
        # commands not yet written (the outage buffer, also the overflow of the pipeline window).
        self._pub_expect: deque[PendingCommand] = deque()
        self._in_flight_bytes = 0
        self._queue: deque[PendingCommand] = deque()
        self._queued_bytes = 0
        self._answers: list[tuple[int, str]] = []
        # Membership: nodes subscribed to {prefix}:all by Redis's latest count (None: not asked
        # yet since the link came up), and how many we expect (see the module docstring).
        self.members: int | None = None
        self.expected_members = 1
        self._short_since: float | None = None
        self._numsub_due = 0.0
        self._numsub_pending = False
        self._seq: dict[bytes, int] = {}
        # Receiving: channel -> origin -> last sequence number; the table from before the latest
        # reconnect still catches duplicates, but a skip across an outage is no gap.
        self._in_seq: dict[bytes, dict[bytes, int]] = {}
        self._in_seq_before: dict[bytes, dict[bytes, int]] = {}
        # Time.
        self._connect_deadline = 0.0
        self._retry_at = 0.0
        self._sub_last_seen = 0.0
        self._ping_deadline: float | None = None
        self._attempts = 0
        self._down_since: float | None = None
        self._reported_up: bool | None = None
        self._ever_up = False
        #: Why the link last went down ("" if it never did).
        self.last_error = ""
        # Counters behind /api/stats and /metrics.
        self.reconnects = 0
        self.gaps = 0
        self.missed = 0
        self.dropped = 0
        self.duplicates = 0
        self.published = 0
        self.received_messages = 0
        self.bad_envelopes = 0

    # ------------------------------------------------------------------ queries

    @property
    def up(self) -> bool:
        return self.state is LinkState.UP

    @property
    def buffered(self) -> int:
        """Messages for other nodes waiting to be written (the outage buffer)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """PUBLISH commands written and not yet answered (the membership and handshake queries
        that share the publishing connection are not publishes)."""
        return sum(1 for item in self._pub_expect if item.kind == REPLY_PUBLISH)

    def wanted_channels(self) -> frozenset[bytes]:
        """Every channel this node needs subscribed (for tests and tools)."""
        return frozenset(self._want)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work; None for never. Pure."""
        state = self.state
        if state is LinkState.UP:
            ping = self._ping_deadline
            due = self._sub_last_seen + self.config.probe_interval if ping is None else ping
            if self._pub_expect:
                stall = self._pub_expect[0].sent_at + self.config.probe_timeout
                if stall < due:
                    due = stall
            if not self._numsub_pending and self._numsub_due < due:
                due = self._numsub_due
            return due
        if state is LinkState.CONNECTING:
            return self._connect_deadline
        if state is LinkState.DOWN:
            return self._retry_at
        return None

    # ------------------------------------------------------------------ internals: connections

    def _advance(self, now: float) -> float:
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _conn(self, role: BrokerRole) -> RedisConnection:
        if role is SUB:
            return self._sub
        if role is PUB:
            return self._pub
        raise LocalProtocolError(f"not a broker role: {role!r}")

    def _auth_command(self) -> bytes | None:
        config = self.config
        if config.password is None:
            return None
        args = [b"AUTH"]
        if config.username is not None:
            args.append(config.username.encode())
        args.append(config.password.encode())
        return encode_command(args)
