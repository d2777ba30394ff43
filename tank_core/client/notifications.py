"""What the client machine tells the application, and how it recognises a topic message.

``TankClient`` returns these after its transport actions (``ClientNotification``); the session rules
(``client_dispatch``) route each to the callbacks of docs/client.md. ``topic_of`` is the reference
client's rule for a topic message (PROTOCOL.md, "What the JS client does").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import LocalProtocolError
from ..wire.codec import reject_json_constant

__all__ = [
    "ClientNotification",
    "Closed",
    "HeartbeatReceived",
    "HeartbeatTimedOut",
    "LatencyMeasured",
    "MessageArrived",
    "Opened",
    "Reconnecting",
    "Recovered",
    "Welcomed",
    "check_utf8",
    "topic_of",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """The WebSocket is open; ``reconnect`` says whether an earlier one existed, ``attempt`` how
    many retries it took since the previous connection ended (1: the first retry)."""

    reconnect: bool
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcomed:
    """The server's Hello frame named our ``user_id``."""

    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageArrived:
    """One message from the server. ``topic`` is set (and ``data`` holds the decoded JSON value)
    when it is a topic message for a topic we hold, recognised as PROTOCOL.md describes.

    In a ``messages(topic)`` stream, an item with ``recovered`` set is not a message but the
    outcome of a recovery after a reconnect (``data`` None): True when everything the topic
    missed came before it, False when messages were lost (reload your state)."""

    text: str
    topic: str | None
    data: object
    recovered: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatReceived:
    """The server's text ``heartbeat`` arrived."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyMeasured:
    """A Pong answered our Ping after ``rtt`` seconds."""

    rtt: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatTimedOut:
    """Nothing arrived for ``silent_for`` seconds; the connection is dropped (and retried)."""

    silent_for: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconnecting:
    """The next attempt starts in ``delay`` seconds; ``attempt`` is the backoff's *n*, the failures
    since the last stable connection (from 1; ``backoff.py``)."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed:
    """A connection ended (``code`` 1006 when no closing handshake happened). ``final`` is True
    when no reconnect follows. An attempt whose upgrade got an HTTP answer other than 101 has its
    status in ``http_status`` and the reason ``upgrade refused with HTTP <status> <phrase>``."""

    code: int
    reason: str
    final: bool
    http_status: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """After a reconnect, the server replayed what ``topic`` missed (``complete``), or could not
    (``complete`` False: too old, or the server lost its history): then reload your state. Only
    with a server that keeps a history and agreed the recovery extension (docs/client.md)."""

    topic: str
    complete: bool


ClientNotification = (
    Recovered
    | Opened
    | Welcomed
    | MessageArrived
    | HeartbeatReceived
    | LatencyMeasured
    | HeartbeatTimedOut
    | Reconnecting
    | Closed
)


def topic_of(text: str, held: dict[str, None]) -> tuple[str | None, object]:
    """``(topic, data)`` of a topic message for a topic in ``held``; ``(None, None)`` otherwise."""
    # PROTOCOL.md, "What the JS client does": the first occurrence of "topic" must be past index 0,
    # then JSON; a truthy "topic" equal to a held topic makes it a topic message.
    index = text.find("topic")
    if index <= 0:
        return None, None
    try:
        # JSON.parse refuses NaN and Infinity; so do we (a relay could carry them).
        value = json.loads(text, parse_constant=reject_json_constant)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    topic = value.get("topic")
    if isinstance(topic, str) and topic and topic in held:
        return topic, value.get("data")
    return None, None


def check_utf8(text: str, what: str) -> None:
    """``LocalProtocolError`` unless ``text`` can be sent (no lone surrogates)."""
    # Checked when given, not when written: a queued bad text must not fail a later open.
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
