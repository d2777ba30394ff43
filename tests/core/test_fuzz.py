"""Arbitrary bytes at every stage of a connection: nothing a peer sends may make the core raise.

DESIGN.md §4: "Every byte sequence ends in events or in a close with the right code (1002, 1007,
1008, 1009, 1011; 400/401/403/404 before the upgrade)". Each stage is fed arbitrary bytes in
arbitrary chunks: before any request, mid-request, after the upgrade, after the Hello, while the
application authorizes the upgrade, after our Close, after shutdown; plus ticks in between.

After the upgrade the bytes are mostly frames, well-formed or not (``frame_soup``), and a reference
parser (``RefParser``: RFC 6455 §5 as wsproto applies it, chunk by chunk, plus PROTOCOL.md's size
limit and binary-UTF-8 rule) predicts the outcome exactly: the connection stays open, fails with
1002/1007/1009, or is closed by the peer (and the Close is echoed). The server's Close code,
Pongs and message counts must match it.
"""

from __future__ import annotations

import codecs
import itertools
import json
import tracemalloc
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tank_core import ServerConfig
from tank_core.actions import Action
from tank_core.notifications import ClientDisconnected
from tank_core.server.engine import ConnectionState
from tank_core.testing import FakeClock, FakePeer, Harness
from tank_core.wire.connection import MAX_CONTROL_BACKLOG

ACTION_TYPES = get_args(Action)
#: Codes the server itself may put in a Close (PROTOCOL.md, "Limits and failures", "Closing").
OWN_CODES = frozenset({1000, 1001, 1002, 1007, 1008, 1009, 1011})
#: What the server accepts in a peer's Close (RFC 6455 §7.4: 1000-2999 only where registered).
KNOWN_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1014,
                         1012, 1013, 1015})
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(target: str = "/ws?user_id=fuzz") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: tank.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    ).encode()


def config(**kwargs: Any) -> ServerConfig:
    base: dict[str, Any] = {"heartbeat_interval": 1.0, "heartbeat_timeout": 3.0,
                            "close_timeout": 1.0, "request_timeout": 2.0}
    base.update(kwargs)
    return ServerConfig(**base)


def harness(**kwargs: Any) -> Harness:
    # A clock inside one binade keeps last_seen + timeout exact (see test_engine_machine.py).
    return Harness(config(**kwargs), clock=FakeClock(start=100_000.0))


# ---------------------------------------------------------------------------- frames


def mask(payload: bytes, key: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ key[(offset + i) % 4] for i, b in enumerate(payload))


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    key: bytes = b"\x12\x34\x56\x78",
    length: str = "min",
    announce: int | None = None,
) -> bytes:
    """A client frame; ``length`` picks the encoding ("min", "16", "64"), ``announce`` lies."""
    n = len(payload) if announce is None else announce
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length == "min":
        length = "7" if n < 126 else "16" if n < 65536 else "64"
    bit = 0x80 if masked else 0
    if length == "7":
        head = bytes((first, bit | n))
    elif length == "16":
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if masked:
        return head + key + mask(payload, key)
    return head + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Complete server frames: final, unextended, unmasked (RFC 6455 §5.1)."""
    frames: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0xF0 == 0x80, f"server frame not final or with RSV bits: {b0:#x}"
        assert not b1 & 0x80, "a server frame is masked"
        n = b1 & 0x7F
        j = i + 2
        if n == 126:
            n = int.from_bytes(data[j : j + 2], "big")
            j += 2
        elif n == 127:
            n = int.from_bytes(data[j : j + 8], "big")
            j += 8
        assert j + n <= len(data), "a truncated server frame"
        frames.append((b0 & 0x0F, data[j : j + n]))
        i = j + n
    return frames


def close_body(payload: bytes) -> tuple[int | None, str]:
    if not payload:
        return None, ""
    assert len(payload) >= 2, "a Close body of one byte"
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")


def split_http(written: bytes, *, head: bool = False) -> tuple[list[tuple[int, bytes]], bytes]:
    """Parse the HTTP responses at the start of ``written``; the rest follows a 101, if any.

    With ``head`` the request was a HEAD: a response may declare a length and send no body.
    """
    responses: list[tuple[int, bytes]] = []
    rest = written
    while rest:
        assert rest.startswith(b"HTTP/1.1 "), rest[:40]
        end = rest.index(b"\r\n\r\n") + 4
        head = rest[:end].decode("latin-1")
        status = int(head[9:12])
        assert 100 <= status <= 599
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        after = rest[end:]
        if head and (not after or after.startswith(b"HTTP/1.1 ")):
            length = 0  # RFC 9110 §9.3.2: the answer to HEAD has no content
        body = rest[end : end + length]
        assert len(body) == length, "a truncated HTTP body"
        responses.append((status, body))
        rest = rest[end + length :]
        if status == 101:
            return responses, rest
        assert status >= 200
    return responses, b""


def check_output(
    h: Harness, conn_id: int, *, echo: set[int | None] = frozenset(), closes: int | None = None
) -> list[tuple[int, bytes]]:
    """Everything written to ``conn_id`` (flushed now) is well-formed; returns its frames.

    Close codes are our own (OWN_CODES) or an echo of a peer's Close; no data frame and no
    second Close follow a Close.
    """
    if h.transports[conn_id].state not in ("aborted",):
        h.flush(conn_id)
    responses, ws = split_http(bytes(h.transports[conn_id].written))
    frames = server_frames(ws)
    assert not ws or (responses and responses[-1][0] == 101)
    closed = False
    seen = 0
    for op, payload in frames:
        assert op in (1, 8, 9, 10), f"opcode {op}"
        assert not closed or op not in (0, 1, 2, 8), "a frame follows our Close"
        if op == 1:
            payload.decode("utf-8")
        elif op == 8:
            closed = True
            seen += 1
            code, _reason = close_body(payload)
            assert code in OWN_CODES or code in echo, f"Close code {code} (echo {echo})"
            assert len(payload) <= 125
    if closes is not None:
        assert seen == closes
    return frames


def check_log(h: Harness) -> None:
    for action in h.log:
        assert isinstance(action, ACTION_TYPES), action


# ---------------------------------------------------------------------------- reference parser


class RefParser:
    """What a WebSocket server built on wsproto with our limits does with a client's bytes.

    RFC 6455 §5.2 framing (masked client frames, no extension so no RSV bit, minimal length
    encodings, 63-bit lengths, control frames final and at most 125 bytes), §5.4 fragmentation,
    §5.6/§8.1 UTF-8 text (incremental, so an error is found in the chunk where it arrives), §7.4
    Close codes; PROTOCOL.md: a message past ``limit`` bytes is 1009, counted as delivered;
    a binary message that is not UTF-8 is dropped.
    """

    def __init__(self, limit: int, *, open_: bool = True) -> None:
        self.limit = limit
        self.open = open_
        self.buf = bytearray()
        self.header: tuple[bool, int, int, bytes] | None = None
        self.consumed = 0
        self.first_chunk = True
        self.msg_op: int | None = None
        self.decoder: Any = None
        self.size = 0
        self.parts: list[bytes] = []
        #: None while open; ("fail", code) or ("close", code or None) once it ends.
        self.outcome: tuple[str, int | None] | None = None
        self.messages: list[bytes] = []
        self.dropped = 0
        self.pings: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        self.buf += data
        while self.outcome is None and self._step():
            pass

    def _fail(self, code: int) -> bool:
        self.outcome = ("fail", code)
        return False

    def _step(self) -> bool:
        buf = self.buf
        if self.header is None:
            if len(buf) < 2:
                return False
            b0, b1 = buf[0], buf[1]
            fin, rsv, op = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
            if op not in (0, 1, 2, 8, 9, 10):
                return self._fail(1002)
            control = op >= 8
            if control and not fin:
                return self._fail(1002)
            n = b1 & 0x7F
            if control and n > 125:
                return self._fail(1002)
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return False
                n, pos = int.from_bytes(buf[2:4], "big"), 4
                if n <= 125:
                    return self._fail(1002)
            elif n == 127:
                if len(buf) < 10:
                    return False
                n, pos = int.from_bytes(buf[2:10], "big"), 10
                if n <= 65535 or n >> 63:
                    return self._fail(1002)
            if rsv or not b1 & 0x80:
                return self._fail(1002)
            if len(buf) < pos + 4:
                return False
            key = bytes(buf[pos : pos + 4])
            del buf[: pos + 4]
            self.header, self.consumed, self.first_chunk = (fin, op, n, key), 0, True
            return True
        fin, op, n, key = self.header
        if op >= 8:
            if len(buf) < n:
                return False
            payload = mask(bytes(buf[:n]), key)
            del buf[:n]
            self.header = None
            self._control(op, payload)
            return True
        take = min(n - self.consumed, len(buf))
        if take == 0 and n > 0:
            return False
        chunk = mask(bytes(buf[:take]), key, self.consumed)
        del buf[:take]
        self.consumed += take
        frame_done = self.consumed == n
        effective = op if self.first_chunk else 0
        self.first_chunk = False
        if frame_done:
            self.header = None
        self._data(effective, chunk, frame_done and fin)
        return True

    def _data(self, effective: int, chunk: bytes, finished: bool) -> None:
        if self.msg_op is None:
            if effective == 0:
                self._fail(1002)
                return
            self.msg_op = effective
        elif effective != 0:
            self._fail(1002)
            return
        if effective == 1:
            self.decoder = codecs.getincrementaldecoder("utf-8")()
        if self.decoder is not None:
            try:
                chunk = self.decoder.decode(chunk, finished).encode()
            except UnicodeDecodeError:
                self._fail(1007)
                return
        self.size += len(chunk)
        if self.size > self.limit:
            self._fail(1009)
            return
        self.parts.append(chunk)
        if finished:
            payload = b"".join(self.parts)
            binary = self.msg_op == 2
            self.msg_op, self.decoder, self.size, self.parts = None, None, 0, []
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                assert binary
                self.dropped += 1
                return
            if self.open:
                self.messages.append(payload)

    def _control(self, op: int, payload: bytes) -> None:
        if op == 9:
            if self.open:
                self.pings.append(payload)
        elif op == 8:
            if not payload:
                self.outcome = ("close", None)
                return
            if len(payload) == 1:
                self._fail(1002)
                return
            code = int.from_bytes(payload[:2], "big")
            if not 1000 <= code <= 4999 or code in (1005, 1006, 1015):
                self._fail(1002)
                return
            if code <= 2999 and code not in KNOWN_CODES:
                self._fail(1002)
                return
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007)
                return
            self.outcome = ("close", code)

    def echo_codes(self) -> set[int | None]:
        return {self.outcome[1]} if self.outcome and self.outcome[0] == "close" else set()


def relayed(messages: list[bytes]) -> list[str]:
    """PROTOCOL.md "Client to server": the messages case 4 relays to the others."""
    out = []
    for payload in messages:
        if payload.startswith((b"sub:", b"unsub:")):
            continue
        try:
            value = json.loads(payload.decode(), parse_constant=lambda c: 1 / 0)
        except (ValueError, ZeroDivisionError, RecursionError):
            value = None
        if isinstance(value, dict) and value.get("type") == "heartbeat":
            continue
        out.append(payload.decode())
    return out


# ---------------------------------------------------------------------------- strategies

_CODES = st.sampled_from([1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1014,
                          1015, 1016, 2999, 3000, 4999, 5000, 999, 0, 65535])
_TEXTS = st.one_of(
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"sub:x", b"unsub:x", b'{"type":"heartbeat"}', b"heartbeat", b"\xe2\x82",
                     b"\xac", b"\xff", b"\xed\xa0\x80", "€".encode(), b"x" * 16, b"x" * 17,
                     b"y" * 100, b"z" * 126]),
    st.binary(max_size=12),
)


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Up to eight client frames, mostly coherent (fragments continue the open message) so that
    streams reach the fast path, the size limit and reassembly; about one frame in five is
    broken: garbage, a reserved opcode or bit, no mask, a non-minimal or 2**63 length, or a
    fragment out of place."""
    out = []
    in_message = False
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["data"] * 8 + ["ping", "pong", "close", "fault"]
                                    + ["fault"]))
        key = draw(st.binary(min_size=4, max_size=4))
        if kind == "data":
            opcode = 0 if in_message else draw(st.sampled_from([1, 1, 2]))
            fin = draw(st.booleans())
            in_message = not fin
            out.append(client_frame(opcode, draw(_TEXTS), fin=fin, key=key))
        elif kind in ("ping", "pong"):
            payload = draw(st.one_of(st.binary(max_size=20),
                                     st.binary(min_size=126, max_size=130)))
            out.append(client_frame(9 if kind == "ping" else 10, payload, key=key))
        elif kind == "close":
            body = draw(st.one_of(
                st.just(b""), st.binary(min_size=1, max_size=1),
                st.tuples(_CODES, _TEXTS).map(lambda t: t[0].to_bytes(2, "big") + t[1][:20]),
            ))
            out.append(client_frame(8, body, key=key))
        else:
            fault = draw(st.sampled_from(["raw", "reserved", "rsv", "unmasked", "len16", "len64",
                                          "msb", "stray", "control_fragment"]))
            payload = draw(_TEXTS)
            opcode = 0 if in_message else draw(st.sampled_from([1, 2]))
            if fault == "raw":
                out.append(draw(st.binary(min_size=1, max_size=16)))
            elif fault == "reserved":
                op = draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
                out.append(client_frame(op, payload[:4], key=key))
            elif fault == "rsv":
                out.append(client_frame(opcode, payload, rsv=draw(st.integers(1, 7)), key=key))
            elif fault == "unmasked":
                out.append(client_frame(opcode, payload, masked=False))
            elif fault == "msb":
                out.append(client_frame(opcode, payload, length="64",
                                        announce=2**63 + len(payload), key=key))
            elif fault == "stray":  # a continuation with no message, or a new one inside one
                out.append(client_frame(1 if in_message else 0, payload, key=key))
            elif fault == "control_fragment":
                out.append(client_frame(9, payload[:4], fin=False, key=key))
            else:
                out.append(client_frame(opcode, payload, key=key,
                                        length="16" if fault == "len16" else "64"))
    return b"".join(out)




def chunks_of(data: bytes, draw: st.DrawFn) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    cuts = [c for c in cuts if 0 < c < len(data)]
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


LIMITS = st.sampled_from([16, 100, 1 << 20])


def check_against_ref(h: Harness, conn_id: int, ref: RefParser, *, messages_in: int = 0) -> None:
    """The connection's fate, Pongs and message counts are the reference parser's."""
    frames = check_output(h, conn_id, echo=ref.echo_codes())
    closes = [close_body(p) for op, p in frames if op == 8]
    pongs = [p for op, p in frames if op == 10]
    engine = h.server.engine
    if ref.outcome is None:
        assert engine.is_open(conn_id), "closed, yet the bytes are valid frames (so far)"
        assert closes == []
    else:
        kind, code = ref.outcome
        assert engine.state_of(conn_id) is None
        assert closes == ([(code, "")] if kind == "close" else [(code, closes[0][1])]), (
            f"expected {ref.outcome}, server wrote {closes}"
        )
    assert pongs == ref.pings
    stats = h.server.stats()
    assert stats.messages_in == messages_in + len(ref.messages)
    assert stats.messages_dropped == ref.dropped


# ---------------------------------------------------------------------------- stages


@given(st.lists(st.one_of(st.binary(min_size=1, max_size=40).map(lambda b: ("feed", b)),
                          st.floats(0, 3).map(lambda t: ("tick", t)),
                          st.just(("eof", b""))), max_size=12))
def test_bytes_before_any_request(ops: list[tuple[str, Any]]) -> None:
    h = harness()
    conn = h.accept()
    for kind, arg in ops:
        if kind == "feed":
            h.feed(conn, arg)
        elif kind == "tick":
            h.clock.advance(arg)
            h.tick()
        else:
            h.peer_closed(conn)
    check_log(h)
    check_output(h, conn)
    # Nothing is stuck: request_timeout, then close_timeout, ends every socket.
    h.clock.advance(10.0)
    h.tick()
    h.clock.advance(10.0)
    h.tick()
    assert h.server.connection_ids() == ()


_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE", "CONNECT", "G\x01T"])
_TARGETS = st.one_of(
    st.sampled_from(["/ws", "/ws?user_id=a", "/healthz", "/metrics", "/api/stats", "/api/publish",
                     "/nope", "*", "//[/ws", "http://[::1/ws", "http://tank.test/ws", "/ws?%zz"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)
_HEADERS = st.lists(st.sampled_from([
    "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
    f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Key: short", "Content-Length: 3",
    "Transfer-Encoding: chunked", "Expect: 100-continue", "Connection: close",
    "Origin: http://x", "Authorization: apikey k", "Sec-WebSocket-Version: 8",
]), max_size=7)


@given(_METHODS, _TARGETS, st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2"]), _HEADERS,
       st.binary(max_size=30), st.data())
def test_http_requests_never_crash_the_server(
    method: str, target: str, version: str, headers: list[str], tail: bytes, data: st.DataObject
) -> None:
    """Plausible HTTP requests (methods, odd targets, header mixes) plus arbitrary bytes."""
    request = f"{method} {target} {version}\r\nHost: tank.test\r\n"
    request += "".join(f"{line}\r\n" for line in headers) + "\r\n"
    h = harness()
    conn = h.accept()
    for chunk in chunks_of(request.encode("latin-1") + tail, data.draw):
        h.feed(conn, chunk)  # must not raise: DESIGN.md §4, "The peer: never an exception"
    check_log(h)
    responses, _ = split_http(bytes(h.transports[conn].written + b"".join(
        h.transports[conn].control)), head=method == "HEAD")
    for status, _body in responses:
        assert status in (101, 200, 400, 401, 403, 404, 405, 408, 411, 413, 414, 431, 501, 505), status


@given(st.integers(0, len(upgrade_request()) - 1), st.lists(st.binary(min_size=1, max_size=30),
                                                            max_size=5))
def test_bytes_mid_request(cut: int, garbage: list[bytes]) -> None:
    h = harness()
    conn = h.accept()
    h.feed(conn, upgrade_request()[:cut])
    for chunk in garbage:
        h.feed(conn, chunk)
    check_log(h)
    check_output(h, conn)


@given(frame_soup(), LIMITS, st.data())
def test_frames_after_the_upgrade(soup: bytes, limit: int, data: st.DataObject) -> None:
    """The request and the frames that follow it arrive in arbitrary chunks."""
    h = harness(max_message_size=limit)
    conn = h.accept()
    request = upgrade_request()
    ref = RefParser(limit)
    offset = 0
    for chunk in chunks_of(request + soup, data.draw):
        h.feed(conn, chunk)
        end = offset + len(chunk)
        if end > len(request):
            ref.feed(chunk[max(0, len(request) - offset) :])
        offset = end
    check_log(h)
    check_against_ref(h, conn, ref)


@given(frame_soup(), LIMITS, st.data())
def test_frames_after_hello(soup: bytes, limit: int, data: st.DataObject) -> None:
    """A peer that has read its Hello sends frames, valid or not; another peer watches."""
    h = harness(max_message_size=limit)
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    ref = RefParser(limit)
    for chunk in chunks_of(soup, data.draw):
        peer.send_raw(chunk)
        ref.feed(chunk)
    check_log(h)
    check_against_ref(h, peer.conn_id, ref)
    observer.read()
    assert observer.messages[1:] == relayed(ref.messages)


@st.composite
def fast_path_stream(draw: st.DrawFn) -> bytes:
    """Complete masked Text, Ping and Pong frames (what a fast path may take) mixed with their
    near misses, which must get exactly wsproto's verdict: a 16-bit length under 126, a 64-bit
    length under 65536, invalid or truncated UTF-8, a size at or past the limit, a fragment."""
    out = []
    for _ in range(draw(st.integers(1, 10))):
        key = draw(st.binary(min_size=4, max_size=4))
        kind = draw(st.sampled_from(["text"] * 6 + ["ping", "pong", "miss", "miss"]))
        if kind in ("ping", "pong"):
            out.append(client_frame(9 if kind == "ping" else 10, draw(st.binary(max_size=125)),
                                    key=key))
            continue
        text = draw(st.one_of(st.text(max_size=8), st.sampled_from(["é" * 50, "x" * 99, "x" * 100,
                                                                    "x" * 101, "y" * 300])))
        payload = text.encode("utf-8", "surrogatepass")
        if kind == "text":
            out.append(client_frame(1, payload, key=key))
            continue
        miss = draw(st.sampled_from(["len16", "len64", "utf8", "cut", "fragment", "binary"]))
        if miss in ("len16", "len64"):
            out.append(client_frame(1, payload[:125], key=key,
                                    length="16" if miss == "len16" else "64"))
        elif miss == "utf8":
            out.append(client_frame(1, payload + b"\xc3", key=key))
        elif miss == "cut":
            out.append(client_frame(1, payload, key=key)[:-1])
        elif miss == "fragment":
            out.append(client_frame(1, payload, fin=False, key=key)
                       + client_frame(0, b"!", key=key))
        else:
            out.append(client_frame(2, payload, key=key))
    return b"".join(out)


@given(fast_path_stream(), st.sampled_from([100, 1 << 20]), st.data())
def test_fast_path_frames_get_the_reference_verdict(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    h = harness(max_message_size=limit)
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    ref = RefParser(limit)
    for chunk in chunks_of(stream, data.draw):
        peer.send_raw(chunk)
        ref.feed(chunk)
    check_log(h)
    check_against_ref(h, peer.conn_id, ref)
    observer.read()
    assert observer.messages[1:] == relayed(ref.messages)


@given(frame_soup(), frame_soup(), st.booleans(), st.data())
def test_bytes_while_authorizing(
    early: bytes, late: bytes, accept: bool, data: st.DataObject
) -> None:
    """Bytes that arrive while the application decides wait for the verdict (reading paused)."""
    h = harness(authenticate=True)
    conn = h.accept()
    ref = RefParser(1 << 20)
    request = upgrade_request()
    for chunk in chunks_of(request + early, data.draw):
        h.feed(conn, chunk)
    assert [r.conn_id for r in h.authorization_requests] == [conn]
    assert h.server.engine.state_of(conn) is None
    assert b"".join(h.transports[conn].control) == b""  # nothing answered yet
    h.answer_authorization(conn, accept)
    if accept:
        ref.feed(early)
    for chunk in chunks_of(late, data.draw):
        h.feed(conn, chunk)
        if accept:
            ref.feed(chunk)
    check_log(h)
    if accept:
        check_against_ref(h, conn, ref)
    else:
        responses, rest = split_http(bytes(h.transports[conn].written) + b"".join(
            h.transports[conn].control))
        assert [status for status, _ in responses] == [401] and rest == b""


@given(frame_soup(), st.sampled_from(["close", "timeout", "shutdown"]), st.data())
def test_frames_after_our_close(soup: bytes, how: str, data: st.DataObject) -> None:
    """After our Close the peer's data is ignored (PROTOCOL.md) and no frame follows our Close;
    the connection ends when the peer's bytes end it, or at close_timeout."""
    h = harness()
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    peer.auto_pong = False
    code = {"close": 1000, "timeout": 1011, "shutdown": 1001}[how]
    if how == "close":
        h.apply(h.server.close(peer.conn_id, now=h.now, wall_time=h.clock.wall_time))
    elif how == "shutdown":
        h.apply(h.server.shutdown(now=h.now, wall_time=h.clock.wall_time))
    else:
        for _ in range(3):  # heartbeat_timeout, ticking on time
            h.clock.advance(1.0)
            h.tick()
            observer.read()
    assert h.server.engine.state_of(peer.conn_id) is ConnectionState.CLOSING
    messages_in = h.server.stats().messages_in
    ref = RefParser(1 << 20, open_=False)
    for chunk in chunks_of(soup, data.draw):
        peer.send_raw(chunk)
        ref.feed(chunk)
    check_log(h)
    frames = check_output(h, peer.conn_id, closes=1)
    assert close_body(next(p for op, p in frames if op == 8))[0] == code
    state = h.server.engine.state_of(peer.conn_id)
    assert (state is ConnectionState.CLOSING) == (ref.outcome is None)
    assert h.server.stats().messages_in == messages_in
    assert not [p for op, p in frames if op == 10], "a Pong after our Close"
    before = len(observer.messages)
    observer.read()
    assert all(m in ("heartbeat", "Server is shutting down") for m in observer.messages[before:])
    h.clock.advance(1.0)  # close_timeout
    h.tick()
    assert h.server.engine.state_of(peer.conn_id) is None


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=5), frame_soup(), st.data())
def test_bytes_after_shutdown(raw: list[bytes], soup: bytes, data: st.DataObject) -> None:
    h = harness()
    peer = h.connect("fuzz")
    h.apply(h.server.shutdown(now=h.now, wall_time=h.clock.wall_time))
    late = h.accept()
    for chunk in [upgrade_request(), *raw]:
        h.feed(late, chunk)
    for chunk in chunks_of(soup, data.draw):
        peer.send_raw(chunk)
    check_log(h)
    responses, rest = split_http(bytes(h.transports[late].written) + b"".join(
        h.transports[late].control))
    assert [status for status, _ in responses] == [503] and rest == b""
    check_output(h, peer.conn_id, closes=1)
    h.clock.advance(1.0)
    h.tick()
    assert h.server.finished


STAGES = ["fresh", "mid_request", "upgraded", "hello", "authorizing", "closed", "shutdown"]


@given(st.sampled_from(STAGES), st.lists(st.one_of(
    frame_soup().map(lambda b: ("feed", b)),
    st.binary(min_size=1, max_size=20).map(lambda b: ("feed", b)),
    st.floats(0, 5).map(lambda t: ("tick", t)),
), max_size=10))
def test_any_stage_with_ticks(stage: str, ops: list[tuple[str, Any]]) -> None:
    """Arbitrary bytes and ticks interleaved, at every stage; nothing raises, every Close code
    is a valid one, and once time passes every socket is gone."""
    h = harness(authenticate=stage == "authorizing")
    if stage in ("hello", "closed", "shutdown"):
        conn = h.connect("fuzz").conn_id
        if stage == "closed":
            h.apply(h.server.close(conn, 3000, "bye", now=h.now, wall_time=h.clock.wall_time))
        elif stage == "shutdown":
            h.apply(h.server.shutdown(now=h.now, wall_time=h.clock.wall_time))
    else:
        conn = h.accept()
        prefix = {"fresh": b"", "mid_request": upgrade_request()[:30]}.get(stage, upgrade_request())
        h.feed(conn, prefix)
    for kind, arg in ops:
        if kind == "feed":
            h.feed(conn, arg)
        else:
            h.clock.advance(arg)
            h.tick()
    if stage == "authorizing" and h.authorization_requests:
        h.answer_authorization(conn, True)
    check_log(h)
    fed = b"".join(arg for kind, arg in ops if kind == "feed")
    check_output(h, conn, echo={3000} | _close_codes_in(fed))
    for _ in range(4):
        h.clock.advance(5.0)
        h.tick()
    assert h.server.engine.connection_count == 0
    assert h.server.connection_ids() == ()


def _close_codes_in(data: bytes) -> set[int | None]:
    """Codes of well-formed Close frames anywhere in ``data`` (what an echo may carry)."""
    codes: set[int | None] = set()
    for i in range(len(data) - 5):
        if data[i] == 0x88 and data[i + 1] & 0x80:
            n = data[i + 1] & 0x7F
            body = mask(data[i + 6 : i + 6 + n], data[i + 2 : i + 6])
            codes.add(int.from_bytes(body[:2], "big") if len(body) >= 2 else None)
    return codes


# ---------------------------------------------------------------------------- specific cases


def test_half_a_frame_then_eof() -> None:
    h = harness()
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    frame = client_frame(1, b"never finished")
    peer.send_raw(frame[: len(frame) // 2])
    assert h.server.engine.is_open(peer.conn_id)
    peer.vanish()
    gone = [(n.code, n.reason) for n in h.notifications
            if isinstance(n, ClientDisconnected) and n.conn_id == peer.conn_id]
    assert gone == [(1006, "connection lost")]
    observer.read()
    assert observer.messages[1:] == []
    assert h.server.engine.state_of(peer.conn_id) is None


@pytest.mark.parametrize("opcode", [1, 2])
def test_announced_2_63_bytes_close_1009_once_the_limit_passes(opcode: int) -> None:
    """A header announcing 2**63-1 bytes: buffered only up to max_message_size, then 1009."""
    limit = 1 << 20
    h = harness(max_message_size=limit)
    peer = h.connect("fuzz")
    key = b"\x00\x00\x00\x00"  # a zero mask keeps the payload readable
    peer.send_raw(client_frame(opcode, b"", length="64", announce=2**63 - 1, key=key)[:14])
    chunk = b"a" * 65536
    sent = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        while sent <= limit:
            peer.send_raw(chunk)
            sent += len(chunk)
            held = tracemalloc.get_traced_memory()[0] - base
            assert held < limit + 4 * len(chunk), f"{held} bytes held after {sent}"
            if sent <= limit:
                assert h.server.engine.is_open(peer.conn_id), f"closed after only {sent} bytes"
    finally:
        tracemalloc.stop()
    assert h.server.engine.state_of(peer.conn_id) is None
    frames = check_output(h, peer.conn_id, closes=1)
    assert close_body(frames[-1][1])[0] == 1009
    peer.send_raw(chunk)  # more of the same is ignored
    check_log(h)


def test_announced_2_63_bytes_but_few_sent_keeps_the_connection() -> None:
    h = harness()
    peer = h.connect("fuzz")
    peer.send_raw(client_frame(2, b"", length="64", announce=2**63 - 1)[:14] + b"abc")
    assert h.server.engine.is_open(peer.conn_id)
    check_output(h, peer.conn_id, closes=0)


@pytest.mark.parametrize("opcode", [1, 2])
@pytest.mark.parametrize("fragments", [1, 2, 5])
def test_exactly_max_message_size_passes_one_more_byte_is_1009(opcode: int, fragments: int) -> None:
    limit = 100
    for size, fails in ((limit, False), (limit + 1, True)):
        h = harness(max_message_size=limit)
        observer = h.connect("observer")
        peer = h.connect("fuzz")
        payload = b"m" * size
        step = -(-size // fragments)
        parts = [payload[i : i + step] for i in range(0, size, step)]
        for index, part in enumerate(parts):
            peer.send_raw(client_frame(opcode if index == 0 else 0, part,
                                       fin=index == len(parts) - 1))
        observer.read()
        if fails:
            frames = check_output(h, peer.conn_id, closes=1)
            assert close_body(frames[-1][1])[0] == 1009
            assert observer.messages[1:] == []
        else:
            assert h.server.engine.is_open(peer.conn_id)
            assert observer.messages[1:] == [payload.decode()]


def test_length_with_the_most_significant_bit_set_is_1002() -> None:
    h = harness()
    peer = h.connect("fuzz")
    peer.send_raw(client_frame(2, b"", length="64", announce=2**63)[:14])
    frames = check_output(h, peer.conn_id, closes=1)
    assert close_body(frames[-1][1])[0] == 1002


def _fails_with(frame: bytes, code: int) -> None:
    h = harness()
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    peer.send_raw(frame)
    frames = check_output(h, peer.conn_id, closes=1)
    assert close_body(frames[-1][1])[0] == code
    assert h.server.engine.state_of(peer.conn_id) is None
    observer.read()
    assert observer.messages[1:] == [], "a broken message was relayed"


def test_unmasked_client_frame_is_1002() -> None:
    _fails_with(client_frame(1, b"hello", masked=False), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_is_1002(opcode: int) -> None:
    _fails_with(client_frame(opcode, b"x"), 1002)


@pytest.mark.parametrize("payload", [b"\xff", b"ok\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_text_is_1007(payload: bytes) -> None:
    _fails_with(client_frame(1, payload), 1007)


def test_invalid_utf8_across_fragments_is_1007() -> None:
    _fails_with(client_frame(1, b"\xe2\x82", fin=False) + client_frame(0, b"(", fin=True), 1007)


def test_valid_utf8_split_across_fragments_is_relayed() -> None:
    h = harness()
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    peer.send_raw(client_frame(1, b"price \xe2\x82", fin=False))
    peer.send_raw(client_frame(0, b"\xac", fin=True))
    observer.read()
    assert observer.messages[1:] == ["price €"]
    assert h.server.engine.is_open(peer.conn_id)


def test_binary_invalid_utf8_is_dropped_and_the_connection_stays() -> None:
    h = harness()
    observer = h.connect("observer")
    peer = h.connect("fuzz")
    peer.send_binary(b"\xff\xfe\xfd")
    peer.send_text("after")
    observer.read()
    assert observer.messages[1:] == ["after"], "an invalid binary message was relayed"
    assert h.server.engine.is_open(peer.conn_id)
    assert h.server.stats().messages_dropped == 1
    check_output(h, peer.conn_id, closes=0)


def test_binary_sub_subscribes_like_text() -> None:
    """PROTOCOL.md: the reference ignores the opcode, so binary ``sub:x`` subscribes."""
    h = harness()
    peer = h.connect("fuzz")
    peer.send_binary(b"sub:x")
    assert h.server.engine.topics_of(peer.conn_id) == frozenset({"x"})
    n, actions = h.server.publish("x", "hello", now=h.now, wall_time=h.clock.wall_time)
    h.apply(actions)
    peer.read()
    assert n == 1 and peer.messages[1:] == ['{"topic":"x","data":"hello"}']


def _control_pending(peer: FakePeer) -> int:
    return sum(map(len, peer.transport.control))


@given(st.lists(st.binary(max_size=125), min_size=1, max_size=40), st.integers(50, 800))
def test_ping_flood_from_a_peer_that_never_reads(payloads: list[bytes], rounds: int) -> None:
    """Pongs are answered without the application, but a peer that never reads cannot make the
    control lane grow past MAX_CONTROL_BACKLOG + one frame."""
    h = harness(text_heartbeat=False)
    peer = h.connect("flood")
    one_frame = 2 + 125
    for i in range(rounds):
        peer.send_ping(payloads[i % len(payloads)])
        assert _control_pending(peer) < MAX_CONTROL_BACKLOG + one_frame
    assert h.server.engine.is_open(peer.conn_id)
    answered = len(peer.transport.control)
    assert answered == rounds or _control_pending(peer) >= MAX_CONTROL_BACKLOG
    peer.read()  # reading drains the lane; Pings are answered again
    pongs = len(peer.pongs)
    peer.send_ping(b"again")
    peer.read()
    assert peer.pongs[pongs:] == [b"again"]


def test_ping_flood_with_heartbeats_keeps_the_control_lane_bounded() -> None:
    """The same bound while time passes: the peer keeps pinging (so it is alive) and never reads.
    Our own heartbeat Pings must not pile up behind the unread Pongs (DESIGN.md §3: the control
    lane is "bounded by construction: one Ping and only the latest Pong")."""
    h = harness(text_heartbeat=False)
    peer = h.connect("flood")
    while _control_pending(peer) < MAX_CONTROL_BACKLOG:
        peer.send_ping(b"p" * 125)
    for _ in range(100):
        h.clock.advance(1.0)
        h.tick()
        peer.send_ping(b"alive")
        assert _control_pending(peer) < MAX_CONTROL_BACKLOG + 2 + 125, (
            f"control lane holds {_control_pending(peer)} bytes after {h.server.stats().pings_sent}"
            " heartbeat pings"
        )


@pytest.mark.parametrize("target", ["/healthz", "/ws", "/nope", "/api/stats"])
def test_head_request_is_answered(target: str) -> None:
    """A HEAD request must get an answer (or a refusal), never crash and poison the server."""
    h = harness()
    conn = h.accept()
    h.feed(conn, f"HEAD {target} HTTP/1.1\r\nHost: tank.test\r\n\r\n".encode())
    written = b"".join(h.transports[conn].control)
    responses, rest = split_http(written, head=True)
    assert len(responses) == 1 and rest == b""
    assert responses[0][1] == b"", "an answer to HEAD carries a body"
    assert h.connect("after").accepted  # the server still serves


@pytest.mark.parametrize("target", ["//[/ws", "http://[::1/ws", "//x]:80/ws"])
def test_request_target_that_urlsplit_rejects_is_answered(target: str) -> None:
    """``urllib.parse.urlsplit`` raises ValueError ("Invalid IPv6 URL") for these targets."""
    h = harness()
    conn = h.accept()
    h.feed(conn, upgrade_request(target))
    responses, _ = split_http(b"".join(h.transports[conn].control))
    assert len(responses) == 1 and 400 <= responses[0][0] < 500
    assert h.connect("after").accepted
