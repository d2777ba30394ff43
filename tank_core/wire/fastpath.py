"""The common frames, parsed without wsproto: complete, masked, unfragmented Text, Ping and Pong.

An idle server's work is Pongs and a busy one's is small text messages, and wsproto spends tens of
microseconds on each. When wsproto's parser stands at a frame boundary with no fragmented message
open, a complete frame of one of these kinds is parsed here; the first frame that is anything else
(a Close, a fragment, binary, a reserved bit, a bad length, invalid UTF-8, a partial frame) and
everything after it go to wsproto, which then finds itself at the same boundary. Property tests
check that both paths give the same result.
"""

from __future__ import annotations

from wsproto.connection import Connection as WsConnection

__all__ = ["OP_PING", "OP_PONG", "OP_TEXT", "at_frame_boundary", "next_frame", "unknown_close_code"]

OP_TEXT = 0x1
OP_PING = 0x9
OP_PONG = 0xA

# First byte of a final, unextended frame (FIN set, RSV1-3 clear) for each opcode we take.
_FIRST_BYTES = {0x80 | OP_TEXT: OP_TEXT, 0x80 | OP_PING: OP_PING, 0x80 | OP_PONG: OP_PONG}


def at_frame_boundary(ws: WsConnection) -> bool:
    """True when wsproto holds no partial frame and no fragmented message.

    Reads wsproto internals (pinned in pyproject); if they ever move, this answers False and
    every frame takes the slow path, which is always correct.
    """
    try:
        proto = ws._proto
        decoder = proto._frame_decoder
        return (
            decoder.header is None
            and len(decoder.buffer) == 0
            and proto._message_decoder.opcode is None
        )
    except AttributeError:
        return False


def next_frame(data: bytes, pos: int, max_text: int) -> tuple[int, bytes, int] | None:
    """Parse one complete fast-path frame at ``data[pos:]``: (opcode, payload, next position).

    None when the frame is not one we take (the caller hands the rest to wsproto). Text payloads
    are returned only when valid UTF-8 and at most ``max_text`` bytes, so the slow path keeps
    the 1007 and 1009 decisions.
    """
    end = len(data)
    if end - pos < 6:
        return None
    opcode = _FIRST_BYTES.get(data[pos])
    if opcode is None:
        return None
    second = data[pos + 1]
    if not second & 0x80:
        return None  # RFC 6455 §5.1: client frames MUST be masked; wsproto fails it with 1002
    length = second & 0x7F
    head = pos + 2
    if length == 126:
        if opcode != OP_TEXT or end - pos < 8:
            return None
        length = (data[head] << 8) | data[head + 1]
        if length < 126:
            return None  # not the minimal encoding: let wsproto judge
        head += 2
    elif length == 127:
        return None
    if length > max_text:
        return None
    start = head + 4
    stop = start + length
    if stop > end:
        return None
    mask = data[head:start]
    payload = _unmask(data[start:stop], mask)
    if opcode == OP_TEXT:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return opcode, payload, stop


#: Close codes registered with IANA that wsproto 1.3 refuses as "unknown reserved" (it answers
#: 1002): 1014 Bad Gateway. RFC 6455 §7.4.2 reserves 1000-2999 for codes the registry defines.
_REGISTERED_UNKNOWN_TO_WSPROTO = frozenset({1014})


def unknown_close_code(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A complete masked Close frame at ``data[pos:]`` whose registered code wsproto does not
    know: ``data`` with that code replaced by 1000 (for wsproto's state machine), and the real
    code, which the caller reports instead. None for anything else."""
    if len(data) - pos < 8 or data[pos] != 0x88:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    if not second & 0x80 or not 2 <= length <= 125 or len(data) - pos < 6 + length:
        return None
    mask = data[pos + 2:pos + 6]
    code = ((data[pos + 6] ^ mask[0]) << 8) | (data[pos + 7] ^ mask[1])
    if code not in _REGISTERED_UNKNOWN_TO_WSPROTO:
        return None
    patched = bytes((0x03 ^ mask[0], 0xE8 ^ mask[1]))  # 1000, masked the same way
    return data[:pos + 6] + patched + data[pos + 8:], code


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    length = len(payload)
    repeated = (mask * (length // 4 + 1))[:length]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(length, "little")
