"""What the server tells the application, in the past tense: connections, subscriptions, messages,
timeouts, slow consumers, errors (the reference's event codes), and a cluster node's broker link.

Each carries ``wall_time`` as data (seconds since the epoch, copied from the event that caused it);
``time`` is its RFC 3339 form. No clock is read. Hooks receive these (docs/embedding.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "BrokerDown",
    "BrokerGap",
    "BrokerUp",
    "ClientConnected",
    "ClientDisconnected",
    "ErrorCode",
    "ErrorOccurred",
    "HeartbeatTimedOut",
    "HttpRequestAnswered",
    "MessageReceived",
    "Notification",
    "SlowConsumerClosed",
    "TopicSubscribed",
    "TopicUnsubscribed",
    "rfc3339",
]


def rfc3339(wall_time: float) -> str:
    """Format seconds since the epoch as an RFC 3339 UTC timestamp (pure: no clock is read)."""
    return datetime.fromtimestamp(wall_time, tz=UTC).isoformat().replace("+00:00", "Z")


class _Timed:
    """Notifications carry ``wall_time`` as data; ``time`` is its RFC 3339 form (no clock read)."""

    __slots__ = ()
    wall_time: float

    @property
    def time(self) -> str:
        return rfc3339(self.wall_time)


class ErrorCode(enum.IntEnum):
    """The reference server's error-event codes (PROTOCOL.md "Event codes"): never close codes."""

    SERIALIZATION_FAILED = 1001
    UPGRADE_FAILED = 1002
    READ_ERROR = 1003
    WRITE_ERROR = 1004
    HEARTBEAT_FAILED = 1005
    AUTHENTICATION_FAILED = 1007


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConnected(_Timed):
    """A WebSocket connection was opened (after the Hello frame was queued)."""

    conn_id: int
    user_id: str
    peer_host: str
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientDisconnected(_Timed):
    """A WebSocket connection ended. ``code`` is the close code the connection ended with
    (the peer's, ours, or 1006 when the transport went without a closing handshake)."""

    conn_id: int
    user_id: str
    code: int
    reason: str
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSubscribed(_Timed):
    conn_id: int
    user_id: str
    topic: str
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicUnsubscribed(_Timed):
    conn_id: int
    user_id: str
    topic: str
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(_Timed):
    """An application message (the reference's case 4) arrived; ``data`` is its UTF-8 text."""

    conn_id: int
    user_id: str
    data: bytes
    wall_time: float

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatTimedOut(_Timed):
    """Nothing arrived from ``conn_id`` for ``silent_for`` seconds; it is being closed with 1011."""

    conn_id: int
    user_id: str
    silent_for: float
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowConsumerClosed(_Timed):
    """``conn_id`` held more than ``max_outbox_bytes`` unsent; it is being closed with 1008."""

    conn_id: int
    user_id: str
    outbox_bytes: int
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorOccurred(_Timed):
    """An error event with the reference's code; ``conn_id`` None when no connection was open yet."""

    code: ErrorCode
    message: str
    conn_id: int | None
    user_id: str | None
    wall_time: float

    def to_json_dict(self) -> dict[str, object]:
        """The reference's error event shape ``{"message","code","time"}``."""
        return {"message": self.message, "code": int(self.code), "time": self.time}


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerUp(_Timed):
    """The broker link is up: every topic, user and fixed channel of this node is subscribed again,
    and publishes held during an outage are being sent. ``downtime`` is how long it was down (None
    the first time). Redis keeps nothing for absent subscribers: this is the application's cue to
    resync what other nodes published meanwhile."""

    reconnects: int
    downtime: float | None
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerDown(_Timed):
    """The broker link is down (``reason``): local delivery goes on, publishes for other nodes
    wait in the bounded outage buffer, and the link reconnects with backoff by itself."""

    reason: str
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerGap(_Timed):
    """Messages from node ``origin`` on ``channel`` never arrived: ``missed`` sequence numbers were
    skipped while the link stayed up (the origin dropped them from its outage buffer, say)."""

    origin: str
    channel: str
    missed: int
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequestAnswered(_Timed):
    """An HTTP request was answered (an API call, a static file, a refused upgrade; not the 101 of
    an accepted one, which ``ClientConnected`` follows): the access log's line."""

    conn_id: int
    peer_host: str
    method: str
    target: str
    status: int
    wall_time: float


Notification = (
    ClientConnected
    | ClientDisconnected
    | TopicSubscribed
    | TopicUnsubscribed
    | MessageReceived
    | HeartbeatTimedOut
    | SlowConsumerClosed
    | ErrorOccurred
    | BrokerUp
    | BrokerDown
    | BrokerGap
    | HttpRequestAnswered
)
