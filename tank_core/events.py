"""Inputs to the server core, named in the past tense: things that happened to a connection.

Every event carries ``now`` (seconds on the adapter's monotonic clock); those that may produce
notifications for the application also carry ``wall_time`` (seconds since the Unix epoch), which the
core only copies into the notifications: it never reads a clock itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BytesReceived",
    "CloseArrived",
    "ConnectionOpened",
    "MessageArrived",
    "Event",
    "TransportClosed",
    "UpgradeAuthorized",
    "UpgradeRefused",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BytesReceived:
    """The socket of ``conn_id`` delivered ``data``."""

    conn_id: int
    data: bytes
    now: float
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportClosed:
    """The socket of ``conn_id`` is gone: EOF, reset, write failure, our own close completing, or
    (for a connection the core asked to open) the open failed.

    ``error`` describes a failure (a reset, a write error); None for an orderly EOF.
    ``write_failed`` says the failure happened while writing (reported as the reference's 1004).
    """

    conn_id: int
    now: float
    wall_time: float
    error: str | None = None
    write_failed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOpened:
    """The connection the core asked for with ``OpenConnection`` is open (a failure to open is
    ``TransportClosed`` with an ``error``)."""

    conn_id: int
    now: float
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeAuthorized:
    """The application's authentication hook accepted the upgrade asked by ``AuthorizeUpgrade``."""

    conn_id: int
    now: float
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeRefused:
    """The application refused the upgrade; ``status`` is the HTTP answer (401 unless told)."""

    conn_id: int
    now: float
    wall_time: float
    status: int = 401
    reason: str = "Unauthorized"


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageArrived:
    """A whole data message on an upgraded connection whose transport does the WebSocket framing
    itself (ASGI; accepted with ``accept(..., messages=True)``): ``data`` is its payload (text as
    UTF-8), ``binary`` says it came as a binary message."""

    conn_id: int
    data: bytes
    binary: bool = False
    now: float
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseArrived:
    """Such a transport says the peer closed the connection (and answered its Close itself):
    ``code`` None when the Close carried none. The connection is gone afterwards."""

    conn_id: int
    code: int | None
    reason: str = ""
    now: float
    wall_time: float


Event = (
    BytesReceived
    | ConnectionOpened
    | TransportClosed
    | UpgradeAuthorized
    | UpgradeRefused
    | MessageArrived
    | CloseArrived
)
