"""Outputs of the core: imperative actions for the adapter, and past-tense notifications for the app.

Two levels share this module. The message-level ``Engine`` emits ``SendText``, ``SendTextToEach``,
``SendPing``, ``StartClose`` and ``CloseTransport`` (an ASGI or HTTP/2 integration maps them onto its
own transport). The byte-level ``TankServer`` keeps what those mean as bytes in its own output lanes
(``output.py``): its adapters take them with ``data_to_send``, and its ``Action`` is only what an
adapter must *do*: open a connection, abort one, pause or resume reading, ask the application.

``BrokerConnect``, ``BrokerWrite`` and ``BrokerClose`` are the broker link's own vocabulary
(docs/scale-out.md), which ``TankServer`` turns into the same connections as any other;
``BrokerUp``, ``BrokerDown`` and ``BrokerGap`` tell the application about it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "AbortTransport",
    "Action",
    "AuthorizeSubscription",
    "AuthorizeUpgrade",
    "BrokerClose",
    "BrokerConnect",
    "BrokerDown",
    "BrokerGap",
    "BrokerRole",
    "BrokerUp",
    "BrokerWrite",
    "ClientConnected",
    "ClientDisconnected",
    "CloseTransport",
    "EngineAction",
    "ErrorCode",
    "ErrorOccurred",
    "HeartbeatTimedOut",
    "MessageReceived",
    "Notification",
    "OpenConnection",
    "PauseReading",
    "ResumeReading",
    "SendPing",
    "SendText",
    "SendTextToEach",
    "SlowConsumerClosed",
    "StartClose",
    "TopicSubscribed",
    "TopicUnsubscribed",
    "UpgradeRequest",
    "rfc3339",
]


def rfc3339(wall_time: float) -> str:
    """Format seconds since the epoch as an RFC 3339 UTC timestamp (pure: no clock is read)."""
    return datetime.fromtimestamp(wall_time, tz=UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- transport actions


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenConnection:
    """Open a TCP connection to ``host``:``port`` under the id ``conn_id`` (a Redis link of a
    cluster node, the client's connection to its server); answer with ``ConnectionOpened`` or,
    when it cannot be opened, ``TransportClosed(error=...)``. From then on it is driven like an
    accepted socket. ``tls``: wrap it in TLS, verifying the certificate for ``host``."""

    conn_id: int
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTransport:
    """Message level (``Engine``): close the transport of ``conn_id`` once everything queued for it
    is written. ``TankServer`` never emits it: its adapters learn it from ``data_to_send``."""

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortTransport:
    """Drop the socket of ``conn_id`` now (or give up opening it), discarding whatever is queued."""

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseReading:
    """Stop reading from ``conn_id`` until ``ResumeReading``."""

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeReading:
    """Read from ``conn_id`` again."""

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeRequest:
    """What the application's authentication hook sees of an upgrade request."""

    method: str
    target: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    peer_host: str
    user_id: str

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name`` (e.g. ``token``), or None."""
        for key, value in self.query:
            if key == name:
                return value
        return None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizeUpgrade:
    """Run the application's authentication hook on ``request`` and answer with
    ``UpgradeAuthorized`` or ``UpgradeRefused``. Reading is paused until then."""

    conn_id: int
    request: UpgradeRequest


# --------------------------------------------------------------------------- broker actions


class BrokerRole(enum.Enum):
    """The two Redis connections of a broker link (docs/scale-out.md): one in subscribe mode,
    one for PUBLISH and its replies."""

    SUBSCRIBER = "subscriber"
    PUBLISHER = "publisher"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConnect:
    """Open a TCP connection to Redis for ``role``; answer with ``TankServer.broker_opened`` or
    ``broker_closed`` (connection refused), passing ``generation`` back."""

    role: BrokerRole
    generation: int
    host: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerWrite:
    """Write ``data`` to the Redis connection of ``role`` (ignore it if that connection is not the
    one of ``generation``)."""

    role: BrokerRole
    generation: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerClose:
    """Close the Redis connection of ``role`` (or give up opening it). ``graceful``: after what is
    queued for it is written (shutdown); otherwise drop it now."""

    role: BrokerRole
    generation: int
    graceful: bool


# --------------------------------------------------------------------------- engine actions


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizeSubscription:
    """Ask the application whether ``conn_id`` may subscribe to ``topic``; answer with
    ``subscription_verdict(conn_id, topic, allowed)``. Only with ``authorize_subscriptions``."""

    conn_id: int
    user_id: str
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SendText:
    """Send one text message (UTF-8 ``payload``) to ``conn_id``."""

    conn_id: int
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTextToEach:
    """Send the same text message to every connection in ``conn_ids``."""

    conn_ids: tuple[int, ...]
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SendPing:
    """Send a Ping with ``payload`` to ``conn_id`` (control lane)."""

    conn_id: int
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StartClose:
    """Send a Close to ``conn_id``. ``code`` None sends an empty Close body (echoing a 1005).

    With ``discard_pending`` the Close replaces queued data (faults, slow consumers); without it, it
    waits behind queued data (operator close, shutdown).
    """

    conn_id: int
    code: int | None
    reason: str
    discard_pending: bool


# --------------------------------------------------------------------------- notifications


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
)

EngineAction = (
    SendText
    | SendTextToEach
    | SendPing
    | StartClose
    | CloseTransport
    | AbortTransport
    | AuthorizeSubscription
    | Notification
)

Action = (
    OpenConnection
    | AbortTransport
    | PauseReading
    | ResumeReading
    | AuthorizeUpgrade
    | AuthorizeSubscription
    | Notification
)
