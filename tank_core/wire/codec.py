"""The Tank text protocol: classify what a client sent, render what the server sends.

PROTOCOL.md, "Client to server": each data message is, in this order, (1) a JSON object whose
``type`` is the string ``"heartbeat"`` (dropped), (2) ``sub:`` + topic, (3) ``unsub:`` + topic,
(4) anything else: an application message, relayed. Topics may be empty and contain ``:``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "HELLO_SUFFIX",
    "SHUTDOWN_TEXT",
    "TEXT_HEARTBEAT",
    "ClientHeartbeat",
    "ClientMessage",
    "Relay",
    "Subscribe",
    "Unsubscribe",
    "classify",
    "reject_json_constant",
    "hello",
    "render_topic_message",
]

#: The reference's text heartbeat frame.
TEXT_HEARTBEAT = b"heartbeat"
#: Sent to everyone when the server shuts down, just before the Close 1001.
SHUTDOWN_TEXT = b"Server is shutting down"
HELLO_SUFFIX = "! Welcome to WebSocket server."


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHeartbeat:
    """Case 1: ``{"type":"heartbeat", ...}``: proof of life, never relayed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Relay:
    """Case 4: an application message, relayed byte for byte."""


ClientMessage = ClientHeartbeat | Subscribe | Unsubscribe | Relay

_HEARTBEAT = ClientHeartbeat()
_RELAY = Relay()


def reject_json_constant(name: str) -> object:
    # NaN and Infinity are not JSON (RFC 8259); Go's decoder, the reference, refuses them.
    raise ValueError(f"{name} is not JSON")


def _is_heartbeat_object(payload: bytes) -> bool:
    # Cheap pre-filter before paying for a parse: a JSON object that spells the key, or may
    # spell it with escapes ({"typ\u0065": ...} is the same key to Go's decoder).
    stripped = payload.lstrip(b" \t\r\n")
    if not stripped.startswith(b"{") or (b"type" not in payload and b"\\u" not in payload):
        return False
    try:
        # Decode as UTF-8 ourselves: json.loads(bytes) would guess UTF-16 for some inputs.
        value = json.loads(payload.decode("utf-8"), parse_constant=reject_json_constant)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and value.get("type") == "heartbeat"


def classify(payload: bytes) -> ClientMessage:
    """Classify one complete message; ``payload`` is valid UTF-8 (the wire layer checked)."""
    if payload.startswith(b"sub:"):
        return Subscribe(topic=payload[4:].decode("utf-8"))
    if payload.startswith(b"unsub:"):
        return Unsubscribe(topic=payload[6:].decode("utf-8"))
    if _is_heartbeat_object(payload):
        return _HEARTBEAT
    return _RELAY


def hello(user_id: str) -> bytes:
    """The first frame on every connection: ``Hello, <id>! Welcome to WebSocket server.``"""
    return f"Hello, {user_id}{HELLO_SUFFIX}".encode()


def _go_escape(text: str) -> str:
    # The reference (Go's encoding/json) escapes <, > and & inside strings; the same JSON value.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_topic_message(topic: str, data: str) -> bytes:
    """``{"topic":"<T>","data":<D>}``: compact, ``topic`` first, as the reference emits it."""
    text = '{"topic":' + json.dumps(topic, ensure_ascii=False) + ',"data":'
    text += json.dumps(data, ensure_ascii=False) + "}"
    if "<" in text or ">" in text or "&" in text:
        text = _go_escape(text)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (possible in API input) has no UTF-8 form: escape it as JSON does.
        text = '{"topic":' + json.dumps(topic) + ',"data":' + json.dumps(data) + "}"
        return _go_escape(text).encode()
