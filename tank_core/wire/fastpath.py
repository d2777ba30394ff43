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
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

__all__ = [
    "OP_PING", "OP_PONG", "OP_TEXT", "RegisteredCloseCodes", "at_frame_boundary", "next_frame"
]

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


class RegisteredCloseCodes(Extension):
    """Lets a peer's Close carry a registered code wsproto does not know (1014).

    Installed on every server connection as a wsproto extension that negotiates nothing: it sees
    each Close payload whole, however the frame was split across reads, hands wsproto 1000 in its
    place, and keeps the real code in ``peer_code`` for the caller to report.
    """

    name = "tank-registered-close-codes"

    def __init__(self) -> None:
        self._close = False
        #: The code the peer's Close really carried, when it was rewritten.
        self.peer_code: int | None = None

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # never offered: it changes nothing on the wire

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        self._close = opcode is Opcode.CLOSE
        return RsvBits(False, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._close and len(data) >= 2:
            code = (data[0] << 8) | data[1]
            if code in _REGISTERED_UNKNOWN_TO_WSPROTO:
                self.peer_code = code
                return b"\x03\xe8" + data[2:]  # 1000, which wsproto knows
        return data


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    length = len(payload)
    repeated = (mask * (length // 4 + 1))[:length]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(length, "little")
