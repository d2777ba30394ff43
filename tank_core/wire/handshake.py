"""The opening handshake, as pure functions over a parsed HTTP request (RFC 6455 §4.2).

Routing and validation only: which path, whether the request is a valid upgrade, the Origin verdict,
the ``user_id`` query parameter and the ``Sec-WebSocket-Accept`` value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from urllib.parse import parse_qsl

__all__ = [
    "accept_key",
    "header_tokens",
    "origin_allowed",
    "split_target",
    "upgrade_problem",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def split_target(target: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The path and the URL-decoded query pairs of a request target (blank values kept).

    Parsed by hand rather than with ``urlsplit``, which raises on targets such as ``//[``: a
    peer's bytes must never make the core raise. The absolute form (``http://host/path``) is
    reduced to its path.
    """
    text = target.decode("latin-1")
    text = text.split("#", 1)[0]
    path, _, query_text = text.partition("?")
    lowered = path[:8].lower()
    if lowered.startswith(("http://", "https://")):
        rest = path.split("://", 1)[1]
        slash = rest.find("/")
        authority = rest if slash < 0 else rest[:slash]
        if authority.count("[") != authority.count("]"):
            return "", ()  # a malformed authority routes nowhere (404)
        path = rest[slash:] if slash >= 0 else "/"
    # Query values are URL-decoded and used verbatim (PROTOCOL.md: user_id).
    query = tuple(parse_qsl(query_text, keep_blank_values=True, errors="replace"))
    return path or "/", query


def header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[str]:
    """Lower-cased comma-separated tokens of every ``name`` header."""
    tokens: set[str] = set()
    for key, value in headers:
        if key == name:
            for token in value.decode("latin-1").split(","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def _single(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [value for key, value in headers if key == name]
    return values[0] if len(values) == 1 else None


def upgrade_problem(
    method: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]]
) -> str | None:
    """Why this request is not a valid WebSocket upgrade (RFC 6455 §4.2.1), or None if it is."""
    if method != b"GET":
        return "the WebSocket handshake must be a GET request"
    if http_version != b"1.1":
        return "the WebSocket handshake needs HTTP/1.1"
    if "websocket" not in header_tokens(headers, b"upgrade"):
        return "missing 'Upgrade: websocket' header"
    if "upgrade" not in header_tokens(headers, b"connection"):
        return "missing 'Connection: Upgrade' header"
    version = _single(headers, b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        return "unsupported Sec-WebSocket-Version (only 13 is supported)"
    key = _single(headers, b"sec-websocket-key")
    if key is None:
        return "missing Sec-WebSocket-Key header"
    try:
        decoded = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "Sec-WebSocket-Key is not base64"
    if len(decoded) != 16:
        return "Sec-WebSocket-Key must encode 16 bytes"
    return None


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2, step 5.4)."""
    digest = hashlib.sha1(key.strip() + _GUID).digest()  # SHA-1 is mandated by RFC 6455
    return base64.b64encode(digest)


def origin_allowed(headers: list[tuple[bytes, bytes]], allowed: frozenset[str]) -> bool:
    """PROTOCOL.md [ext]: with ``allowed_origins`` set, the Origin header must be one of them."""
    if not allowed:
        return True
    origin = _single(headers, b"origin")
    return origin is not None and origin.decode("latin-1").strip() in allowed
