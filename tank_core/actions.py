"""What the core asks of whoever drives it, in the imperative.

``Action`` is what a ``TankServer`` returns to its adapter: open a connection, abort one, pause or
resume reading, ask the application for a verdict (``AuthorizeUpgrade``, ``AuthorizeSubscription``),
and the notifications for the application (``tank_core.notifications``). Bytes are not actions: the
server keeps them in its output lanes until the adapter takes them (``data_to_send``).

``EngineAction`` is the message-level ``Engine``'s output (``SendText``, ``SendTextToEach``,
``SendPing``, ``StartClose``, ``CloseTransport``, ``AbortTransport``), for an integration that
already speaks WebSocket messages (ASGI, HTTP/2) and maps them onto its own transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from .notifications import Notification

__all__ = [
    "AbortTransport",
    "Action",
    "AuthorizeSubscription",
    "AuthorizeUpgrade",
    "CloseTransport",
    "EngineAction",
    "OpenConnection",
    "PauseReading",
    "ResumeReading",
    "SendPing",
    "SendText",
    "SendTextToEach",
    "StartClose",
    "UpgradeRequest",
]


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
