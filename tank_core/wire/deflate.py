"""permessage-deflate on the wire (RFC 7692 §7.2): compress once for many, inflate within a limit.

``MessageDeflater`` compresses what the server sends. Each message is compressed on its own (we
always agree ``server_no_context_takeover``), so its bytes are the same for every connection with
the same window and one compressed frame is shared by all of them, as the plain one is.

``DeflateExtension`` plugs into wsproto for what goes through it: the messages a peer sends us,
and, for our client, the messages it sends. Inflating is bounded: each chunk of input may inflate
to at most the rest of the message size limit, so a small frame that would inflate to gigabytes
(a deflate bomb) fails with 1009 having cost at most the limit.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import RemoteProtocolError

from .deflate_offer import EXTENSION_NAME, DeflateParams, client_offer, read_response

__all__ = ["DEFAULT_LEVEL", "DeflateExtension", "MessageDeflater"]

#: RFC 7692 §7.2.1: the sender removes the 4 octets 0x00 0x00 0xff 0xff that end its flush, and
#: §7.2.2: the receiver appends them again before inflating.
_TAIL = b"\x00\x00\xff\xff"
#: zlib's level 6 compresses JSON about as well as 9, at half the time.
DEFAULT_LEVEL = 6
#: memLevel 8 (zlib's default) holds 256 KiB per compressor; 5 holds 64 KiB and loses little on
#: short messages. The server has one compressor per window size, the client one in all.
_MEM_LEVEL = 5


class MessageDeflater:
    """Compresses messages one at a time, each without reference to the ones before."""

    __slots__ = ("_compressor", "window")

    def __init__(self, window: int, level: int = DEFAULT_LEVEL) -> None:
        self.window = window
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -window, _MEM_LEVEL)

    def compress(self, payload: bytes) -> bytes | None:
        """The compressed payload of one message, or None when it would not be smaller."""
        compressor = self._compressor
        # Z_FULL_FLUSH ends the output on a byte boundary with the empty stored block §7.2.1
        # strips, and forgets the window: the next message is inflatable without this one.
        data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
        if not data.endswith(_TAIL):
            return None  # zlib always ends a flush so; never send what we cannot prove valid
        data = data[:-4]
        return data if len(data) < len(payload) else None


class DeflateExtension(Extension):
    """permessage-deflate for wsproto: inflate what the peer sends, within ``max_message_size``;
    on a client, also compress what it sends (from ``threshold`` bytes up).

    A server builds it already agreed (``params``, from ``negotiate``); a client builds it empty,
    wsproto puts ``offer()`` in the request and passes the answer to ``finalize``.
    """

    name = EXTENSION_NAME

    def __init__(
        self,
        *,
        max_message_size: int,
        params: DeflateParams | None = None,
        threshold: int = 0,
        level: int = DEFAULT_LEVEL,
    ) -> None:
        self.max_message_size = max_message_size
        self.params = params
        self.threshold = threshold
        self.level = level
        self._inflater: zlib._Decompress | None = None
        self._deflater: zlib._Compress | None = None
        #: The message being received is compressed (set by its first frame, RFC 7692 §6.1).
        self._compressed = False
        #: The frame being received belongs to a data message (not a control frame).
        self._data_frame = False
        #: Bytes the message being received has inflated to so far.
        self._inflated = 0
        #: The message being sent is compressed (continuation frames follow its first frame).
        self._sending_compressed = False
        #: Why the last inbound failure happened, for the close reason.
        self.failure = ""

    # ------------------------------------------------------------------ negotiation

    def enabled(self) -> bool:
        return self.params is not None

    def offer(self) -> str:
        return client_offer()

    def finalize(self, offer: str) -> None:
        params = read_response(offer)
        if params is None:
            raise RemoteProtocolError(f"malformed permessage-deflate answer: {offer!r}")
        self.params = params

    # ------------------------------------------------------------------ receiving

    def _windows(self, client: bool) -> tuple[int, bool]:
        """(window bits, whether context is dropped after each message) of what we receive."""
        params = self.params
        assert params is not None
        if client:
            return max(params.server_window, 9), params.server_no_context_takeover
        return params.inflate_window, params.client_no_context_takeover

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # RFC 7692 §6.1: RSV1 on a control frame is an error; a Ping between the fragments of
            # a compressed message leaves that message's state alone.
            self._data_frame = False
            if rsv.rsv1:
                self.failure = "RSV1 set on a control frame"
                return CloseReason.PROTOCOL_ERROR
            return RsvBits(False, False, False)
        self._data_frame = True
        if opcode is Opcode.CONTINUATION:
            # §6.1: only the first frame of a message carries RSV1.
            if rsv.rsv1:
                self.failure = "RSV1 set on a continuation frame"
                return CloseReason.PROTOCOL_ERROR
            return RsvBits(False, False, False)
        self._compressed = rsv.rsv1
        self._inflated = 0
        return RsvBits(rsv.rsv1, False, False)

    def _inflate(self, data: bytes, client: bool) -> bytes | CloseReason:
        inflater = self._inflater
        if inflater is None:
            window, _ = self._windows(client)
            inflater = self._inflater = zlib.decompressobj(-window)
        room = self.max_message_size - self._inflated + 1
        try:
            out = inflater.decompress(data, room)
        except zlib.error as exc:
            self.failure = f"invalid compressed data: {exc}"
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if inflater.unconsumed_tail or self._inflated > self.max_message_size:
            # PROTOCOL.md, Limits: the limit applies to the inflated message -> 1009.
            self.failure = f"message larger than {self.max_message_size} bytes"
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._data_frame or not self._compressed or not data:
            return data
        return self._inflate(data, proto.client)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not self._data_frame or not fin:
            return None
        if not self._compressed:
            return None
        self._compressed = False
        result = self._inflate(_TAIL, proto.client)
        inflater = self._inflater
        _, fresh = self._windows(proto.client)
        if fresh or (inflater is not None and inflater.eof):
            # No context to keep (agreed, or the peer ended its stream with a final block).
            self._inflater = None
        return result

    # ------------------------------------------------------------------ sending (clients)

    def frame_outbound(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        if opcode.iscontrol() or not proto.client or self.params is None:
            return rsv, data  # the server frames its own data messages (frames.py)
        if opcode is not Opcode.CONTINUATION:
            # zlib cannot keep within a 256-byte window (deflate_offer.py): then we send plain.
            self._sending_compressed = (
                len(data) >= self.threshold and self.params.client_window >= 9
            )
        if not self._sending_compressed:
            return rsv, data
        deflater = self._deflater
        if deflater is None:
            deflater = self._deflater = zlib.compressobj(
                self.level, zlib.DEFLATED, -self.params.client_window, _MEM_LEVEL
            )
        out = deflater.compress(data)
        if fin:
            # With client_no_context_takeover agreed, a full flush forgets the window (§7.1.1.2).
            mode = zlib.Z_FULL_FLUSH if self.params.client_no_context_takeover else zlib.Z_SYNC_FLUSH
            out += deflater.flush(mode)
            out = out[:-4]
        if opcode is not Opcode.CONTINUATION:
            rsv = RsvBits(True, rsv.rsv2, rsv.rsv3)
        return rsv, out
