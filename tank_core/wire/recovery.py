"""The recovery extension on the wire (issue 11): numbered publications and ``recover:``.

Only a client that offers the subprotocol ``tank.recovery.v1`` sees any of it. The server agrees
it whenever offered (browsers fail a handshake that ignores a subprotocol they offered); without a
history no publication is numbered and every recovery says ``complete`` false. tank-websocket.js
2.0.3 and plain WebSocket programs never offer it and keep getting the reference's frames byte for
byte (PROTOCOL.md, [ext]). For such a client:

- a publication on a topic with history reads ``{"topic":T,"data":D,"offset":O,"epoch":"E"}``:
  the reference's two keys first, then its place in the topic's history;
- ``recover:{"topic":T,"epoch":"E","offset":O}`` subscribes like ``sub:T`` and first sends, in
  order, every publication after offset O of epoch E, then
  ``{"type":"recovered","topic":T,"epoch":"E","offset":O2,"complete":true}``; when the history
  cannot cover the gap (too old, another epoch) nothing is replayed and ``complete`` is false:
  the client must reload its state, then go on from offset O2 of epoch E;
- ``recover:{"topic":T}`` is a first subscription: it replays nothing and the ``recovered``
  message tells where the topic stands (epoch ``""`` and offset 0 before its first publication:
  a later recovery from there is complete while the history still holds offset 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .codec import ClientMessage, classify, reject_json_constant, render_topic_message

__all__ = [
    "RECOVER_PREFIX",
    "SUBPROTOCOL",
    "BadRecover",
    "Recover",
    "classify_opted_in",
    "parse_recover",
    "render_numbered",
    "render_recovered",
]

SUBPROTOCOL = "tank.recovery.v1"
RECOVER_PREFIX = b"recover:"


@dataclass(frozen=True, slots=True, kw_only=True)
class Recover:
    """``recover:``: subscribe to ``topic`` and replay what followed ``offset`` of ``epoch``."""

    topic: str
    #: None (with ``offset`` None): a first subscription, which learns where the topic stands.
    epoch: str | None
    offset: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BadRecover:
    """A ``recover:`` command that cannot be read: closed 1008 with ``reason``."""

    reason: str


def parse_recover(body: bytes) -> Recover | BadRecover:
    """The JSON object after ``recover:``."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=reject_json_constant)
    except (ValueError, RecursionError):
        return BadRecover(reason="recover: wants a JSON object")
    if not isinstance(value, dict):
        return BadRecover(reason="recover: wants a JSON object")
    topic, epoch, offset = value.get("topic"), value.get("epoch"), value.get("offset")
    if not isinstance(topic, str):
        return BadRecover(reason="recover: wants a string topic")
    if epoch is None and offset is None:
        return Recover(topic=topic, epoch=None, offset=None)
    if not isinstance(epoch, str):
        return BadRecover(reason="recover: wants a string epoch with its offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return BadRecover(reason="recover: wants an integer offset >= 0")
    return Recover(topic=topic, epoch=epoch, offset=offset)


def classify_opted_in(payload: bytes) -> ClientMessage | Recover | BadRecover:
    """``codec.classify`` for a connection that agreed the extension: ``recover:`` is a command
    (for any other connection it is an application message, relayed like any other)."""
    if payload.startswith(RECOVER_PREFIX):
        return parse_recover(payload[len(RECOVER_PREFIX):])
    return classify(payload)


def render_numbered(topic: str, data: str, epoch: str, offset: int) -> bytes:
    """A publication with its place in the history (for clients that agreed the extension)."""
    plain = render_topic_message(topic, data)
    return plain[:-1] + b',"offset":%d,"epoch":' % offset + json.dumps(epoch).encode() + b"}"


def render_recovered(topic: str, epoch: str, offset: int, complete: bool) -> bytes:
    """The end of a replay: where the topic's history stands, and whether nothing was missed."""
    return json.dumps(
        {"type": "recovered", "topic": topic, "epoch": epoch, "offset": offset,
         "complete": complete},
        separators=(",", ":"), ensure_ascii=False,
    ).encode("utf-8", "backslashreplace")
