"""Server-side WebSocket frames built once and shared by every recipient.

RFC 6455 §5.1: "A server MUST NOT mask any frames that it sends to the client." With no extension
negotiated, an unfragmented text frame is the same bytes for every client, so a publish is framed
once. Property tests check these bytes against wsproto's own framing.
"""

from __future__ import annotations

import struct

__all__ = ["compressed_text_frame", "frame_overhead", "ping_frame", "pong_frame", "text_frame"]

_FIN_TEXT = 0x81
#: RFC 7692 §6.1: RSV1 on the first frame marks a compressed message ("Per-Message Compressed").
_FIN_RSV1_TEXT = 0xC1


def frame_overhead(payload_length: int) -> int:
    """Header bytes of an unmasked frame carrying ``payload_length`` bytes (RFC 6455 §5.2)."""
    if payload_length < 126:
        return 2
    if payload_length < 65536:
        return 4
    return 10


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame around ``payload`` (which must be valid UTF-8)."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, length) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, length) + payload


def compressed_text_frame(data: bytes) -> bytes:
    """One unmasked, final text frame carrying a message compressed with permessage-deflate."""
    length = len(data)
    if length < 126:
        return bytes((_FIN_RSV1_TEXT, length)) + data
    if length < 65536:
        return struct.pack("!BBH", _FIN_RSV1_TEXT, 126, length) + data
    return struct.pack("!BBQ", _FIN_RSV1_TEXT, 127, length) + data


def _control_frame(opcode: int, payload: bytes) -> bytes:
    # RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
    if len(payload) > 125:
        raise ValueError("a control frame carries at most 125 bytes")
    return bytes((0x80 | opcode, len(payload))) + payload


def ping_frame(payload: bytes) -> bytes:
    """An unmasked Ping frame."""
    return _control_frame(0x9, payload)


def pong_frame(payload: bytes) -> bytes:
    """An unmasked Pong frame; RFC 6455 §5.5.3: it carries the Ping's payload."""
    return _control_frame(0xA, payload)
