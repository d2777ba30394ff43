"""PROTOCOL.md, row by row, on the wire: every table row and observable bullet through ``Harness``.

Peers are ``FakePeer`` (wsproto clients) or raw bytes; assertions look at what a client reads, and
where byte-exactness is promised, at the exact bytes the server wrote. The clock is a ``FakeClock``
starting at a binary-exact offset so that "just before the deadline" is exactly representable.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import AcceptConnection, Message, Pong, Request
from wsproto.extensions import PerMessageDeflate

from tank_core import ConfigError, LocalProtocolError, ServerConfig
from tank_core.actions import AbortTransport, AuthorizeUpgrade
from tank_core.notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
    MessageReceived,
    SlowConsumerClosed,
    TopicSubscribed,
    TopicUnsubscribed,
)
from tank_core.testing import FakeClock, FakePeer, Harness
from tank_core.wire.codec import render_topic_message
from tank_core.wire.frames import text_frame

START = 1024.0  # binary-exact, so START + 15 - 2**-20 is exact
EPS = 2.0**-20
N = TypeVar("N")

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# --------------------------------------------------------------------------- helpers


def make(**config: Any) -> Harness:
    return Harness(ServerConfig(**config), clock=FakeClock(START))


class At(TypedDict):
    now: float
    wall_time: float


def at(h: Harness) -> At:
    return {"now": h.now, "wall_time": h.clock.wall_time}


def publish(h: Harness, topic: str, data: str) -> int:
    delivered, actions = h.server.publish(topic, data, **at(h))
    h.apply(actions)
    return delivered


def broadcast(h: Harness, text: str, exclude: int | None = None) -> int:
    delivered, actions = h.server.broadcast(text, exclude=exclude, **at(h))
    h.apply(actions)
    return delivered


def of_type(h: Harness, kind: type[N]) -> list[N]:
    return [n for n in h.notifications if isinstance(n, kind)]


@dataclass(frozen=True)
class Frame:
    opcode: int
    fin: bool
    rsv: int
    masked: bool
    payload: bytes


def parse_frames(data: bytes) -> list[Frame]:
    """Split server-to-client bytes into frames (no masking expected, RFC 6455 §5.1)."""
    frames: list[Frame] = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        length = b1 & 0x7F
        i += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        masked = bool(b1 & 0x80)
        if masked:
            i += 4
        assert i + length <= len(data), "truncated frame"
        frames.append(Frame(b0 & 0x0F, bool(b0 & 0x80), b0 & 0x70, masked, bytes(data[i : i + length])))
        i += length
    return frames


def written_frames(peer: FakePeer) -> list[Frame]:
    """Every frame the server has written to ``peer`` so far (flushing what is queued)."""
    peer.read()
    head, sep, rest = bytes(peer.transport.written).partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 101"), head
    return parse_frames(rest)


def data_frames(peer: FakePeer) -> list[Frame]:
    return [f for f in written_frames(peer) if f.opcode in (0, TEXT, BINARY)]


def close_frame(peer: FakePeer) -> Frame | None:
    closes = [f for f in written_frames(peer) if f.opcode == CLOSE]
    assert len(closes) <= 1, closes
    return closes[0] if closes else None


def close_code(frame: Frame | None) -> tuple[int, str] | None:
    if frame is None:
        return None
    if not frame.payload:
        return (1005, "")
    return (struct.unpack("!H", frame.payload[:2])[0], frame.payload[2:].decode())


def code_of(peer: FakePeer) -> int:
    """The code of the Close the server wrote to ``peer`` (which must exist)."""
    closed = close_code(close_frame(peer))
    assert closed is not None, "no Close frame was written"
    return closed[0]


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """A client frame built by hand (for frames wsproto refuses to send)."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = b"\x37\xfa\x21\x3d"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_http(data: bytes) -> RawAnswer:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawAnswer(status, headers, body)


KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(
    target: str = "/ws",
    *,
    method: str = "GET",
    version: str = "1.1",
    drop: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    headers = {
        "Host": "tank.test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(replace or {})
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw(h: Harness, data: bytes, peer_host: str = "127.0.0.1") -> tuple[int, RawAnswer]:
    conn = h.accept(peer_host)
    h.feed(conn, data)
    return conn, parse_http(h.flush(conn))


def silent(h: Harness, user: str = "quiet") -> FakePeer:
    peer = h.connect(user)
    peer.auto_pong = False
    return peer


# =========================================================================== Handshake


def test_default_path_is_ws_and_plain_get_upgrades() -> None:
    h = make()
    assert h.config.path == "/ws"
    peer = h.connect("alice")
    assert peer.accepted
    assert peer.messages == ["Hello, alice! Welcome to WebSocket server."]


def test_101_is_plain_even_when_subprotocol_and_deflate_are_offered() -> None:
    """PROTOCOL.md [ref]: no subprotocol; deflate only when the server's compression is on."""
    h = make(compression=False)
    peer = FakePeer(h)
    request = Request(
        host="tank.test",
        target="/ws?user_id=a",
        subprotocols=["chat", "superchat"],
        extensions=[PerMessageDeflate()],
    )
    peer.send_raw(peer.ws.send(request))
    events = peer.read()
    accepts = [e for e in events if isinstance(e, AcceptConnection)]
    assert len(accepts) == 1
    assert accepts[0].subprotocol is None
    assert accepts[0].extensions == []
    head = bytes(peer.transport.written).partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 101")
    assert b"sec-websocket-protocol" not in head
    assert b"sec-websocket-extensions" not in head
    # Frames are then plain: no RSV1 (compression) bit on anything we send.
    peer.send_text("sub:t")
    publish(h, "t", "y" * 300)
    assert all(f.rsv == 0 for f in written_frames(peer))
    assert peer.messages[-1] == json.dumps({"topic": "t", "data": "y" * 300}, separators=(",", ":"))


def test_101_carries_the_rfc_6455_accept_key() -> None:
    h = make()
    conn = h.accept()
    h.feed(conn, upgrade_request())
    answer = parse_http(h.flush(conn))
    assert answer.status == 101
    # RFC 6455 §1.3 example: this key gives this accept value.
    assert answer.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert answer.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in answer.headers["connection"].lower()


@pytest.mark.parametrize(
    "user_id",
    ["alice", "a b", "a+b", "用户/1?&=#", "%41", "x" * 300, " padded ", "emoji🚀"],
)
def test_user_id_is_url_decoded_and_used_verbatim(user_id: str) -> None:
    h = make()
    peer = h.connect(user_id)  # Harness percent-encodes every byte of it
    assert peer.messages == [f"Hello, {user_id}! Welcome to WebSocket server."]
    assert [c.user_id for c in of_type(h, ClientConnected)] == [user_id]


def test_plus_in_the_query_decodes_to_a_space_like_go() -> None:
    h = make()
    conn, _ = raw(h, upgrade_request("/ws?user_id=a+b%2Bc"))
    assert [c.user_id for c in of_type(h, ClientConnected)] == ["a b+c"]
    assert conn in h.server.engine.open_connections()


def test_first_user_id_value_wins_like_go_query_get() -> None:
    h = make()
    raw(h, upgrade_request("/ws?token=t&user_id=first&user_id=second"))
    assert [c.user_id for c in of_type(h, ClientConnected)] == ["first"]


@pytest.mark.parametrize("target", ["/ws", "/ws?user_id=", "/ws?other=1", "/ws?user_id"])
def test_missing_or_empty_user_id_is_generated(target: str) -> None:
    h = make()
    peer = FakePeer(h)
    peer.handshake(target)
    assert peer.accepted
    assert peer.user_id
    assert peer.messages == [f"Hello, {peer.user_id}! Welcome to WebSocket server."]


def test_generated_user_ids_are_unique() -> None:
    h = make()
    ids = []
    for _ in range(50):
        peer = FakePeer(h)
        peer.handshake("/ws")
        ids.append(peer.user_id)
    assert all(ids)
    assert len(set(ids)) == len(ids)


def test_two_connections_may_share_an_id() -> None:
    h = make()
    one, two = h.connect("same"), h.connect("same")
    assert one.accepted and two.accepted
    assert one.user_id == two.user_id == "same"
    assert one.conn_id != two.conn_id
    # They are different connections: a relay from one reaches the other, not the sender.
    one.send_text("from one")
    assert two.take() == ["Hello, same! Welcome to WebSocket server.", "from one"]
    assert one.take() == ["Hello, same! Welcome to WebSocket server."]
    assert sorted(h.server.engine.connections_of("same")) == sorted([one.conn_id, two.conn_id])


BAD_UPGRADES = {
    "plain GET": upgrade_request(drop=("Upgrade", "Connection", "Sec-WebSocket-Key")),
    "POST": upgrade_request(method="POST", extra=(("Content-Length", "0"),)),
    "PUT": upgrade_request(method="PUT", extra=(("Content-Length", "0"),)),
    "HTTP/1.0": upgrade_request(version="1.0"),
    "missing key": upgrade_request(drop=("Sec-WebSocket-Key",)),
    "key not base64": upgrade_request(replace={"Sec-WebSocket-Key": "not base64!!"}),
    "key not 16 bytes": upgrade_request(replace={"Sec-WebSocket-Key": "c2hvcnQ="}),
    "missing version": upgrade_request(drop=("Sec-WebSocket-Version",)),
    "version 8": upgrade_request(replace={"Sec-WebSocket-Version": "8"}),
    "missing Upgrade": upgrade_request(drop=("Upgrade",)),
    "Upgrade: h2c": upgrade_request(replace={"Upgrade": "h2c"}),
    "missing Connection": upgrade_request(drop=("Connection",)),
    "Connection: keep-alive": upgrade_request(replace={"Connection": "keep-alive"}),
}


@pytest.mark.parametrize("name", list(BAD_UPGRADES))
def test_a_request_that_is_not_a_valid_upgrade_on_the_path_is_400(name: str) -> None:
    h = make()
    conn, answer = raw(h, BAD_UPGRADES[name])
    assert answer.status == 400
    assert h.transports[conn].state in ("closing", "closed")
    assert not of_type(h, ClientConnected)
    assert h.server.engine.connection_count == 0
    if "version" in name:
        # RFC 6455 §4.4: tell the client which version we speak.
        assert answer.headers["sec-websocket-version"] == "13"


# (`/` is the status page and `/tank.js` the JS client since issue 6: test_static_routes.py.)
@pytest.mark.parametrize("target", ["/index.html", "/wss", "/ws/", "/WS", "/other", "/api"])
def test_other_paths_are_404_even_with_valid_upgrade_headers(target: str) -> None:
    h = make()
    _, answer = raw(h, upgrade_request(target))
    assert answer.status == 404
    assert not of_type(h, ClientConnected)


def test_custom_path_moves_the_websocket() -> None:
    h = make(path="/socket")
    assert raw(h, upgrade_request("/ws"))[1].status == 404
    assert raw(h, upgrade_request("/socket"))[1].status == 101


def test_auth_hook_sees_the_whole_request_before_the_upgrade() -> None:
    h = make(authenticate=True)
    conn = h.accept()
    actions = h.feed(
        conn,
        upgrade_request("/ws?user_id=u1&token=abc", extra=(("Cookie", "sid=42"), ("X-Token", "t"))),
    )
    asks = [a for a in actions if isinstance(a, AuthorizeUpgrade)]
    assert len(asks) == 1
    request = asks[0].request
    assert request.query_value("token") == "abc"
    assert request.header("cookie") == "sid=42"
    assert request.header("X-Token") == "t"
    assert request.user_id == "u1" and request.path == "/ws" and request.method == "GET"
    # Nothing is written (no 101) and reading is paused until the verdict.
    assert h.flush(conn) == b""
    assert h.transports[conn].paused


def test_auth_refused_is_401_unauthorized_and_never_upgraded() -> None:
    h = make(authenticate=True)
    conn = h.accept()
    h.feed(conn, upgrade_request("/ws?user_id=u1&token=bad"))
    h.answer_authorization(conn, False)
    answer = parse_http(h.flush(conn))
    assert answer.status == 401
    assert answer.body == b"Unauthorized"
    assert answer.headers["content-type"].startswith("text/plain")
    assert h.transports[conn].state == "closed"
    assert not of_type(h, ClientConnected)
    assert h.server.engine.connection_count == 0


def test_auth_accepted_upgrades() -> None:
    h = make(authenticate=True)
    conn = h.accept()
    h.feed(conn, upgrade_request("/ws?user_id=u1&token=good"))
    h.answer_authorization(conn, True)
    out = h.flush(conn)
    assert parse_http(out).status == 101
    frames = parse_frames(out.partition(b"\r\n\r\n")[2])
    assert frames[0] == Frame(TEXT, True, 0, False, b"Hello, u1! Welcome to WebSocket server.")
    assert not h.transports[conn].paused


def test_origin_outside_allowed_origins_is_403() -> None:
    h = make(allowed_origins=frozenset({"https://good.example"}))
    _, answer = raw(h, upgrade_request(extra=(("Origin", "https://evil.example"),)))
    assert answer.status == 403
    _, answer = raw(h, upgrade_request())  # no Origin at all
    assert answer.status == 403
    assert not of_type(h, ClientConnected)
    _, answer = raw(h, upgrade_request(extra=(("Origin", "https://good.example"),)))
    assert answer.status == 101


@pytest.mark.parametrize("origin", ["https://anything.example", "null", "http://localhost:1234", None])
def test_any_origin_is_accepted_by_default(origin: str | None) -> None:
    h = make()
    extra = () if origin is None else (("Origin", origin),)
    _, answer = raw(h, upgrade_request(extra=extra))
    assert answer.status == 101


# =========================================================================== Client to server


def three(h: Harness) -> tuple[FakePeer, FakePeer, FakePeer]:
    a, b, c = h.connect("a"), h.connect("b"), h.connect("c")
    for p in (a, b, c):
        p.take()
    return a, b, c


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"heartbeat"}',
        '{"type":"heartbeat","ts":1700000000}',
        '{"ts":1,"type":"heartbeat","nested":{"a":[1,2,null]}}',
        ' \t\r\n{ "type" : "heartbeat" } \n',
        '{"type":"heartbeat","type2":"x"}',
        '{"type":"heart\\u0062eat"}',
    ],
)
def test_row1_heartbeat_object_is_dropped(text: str) -> None:
    h = make()
    a, b, c = three(h)
    a.send_text(text)
    assert (a.take(), b.take(), c.take()) == ([], [], [])
    assert not of_type(h, MessageReceived)
    assert h.server.engine.is_open(a.conn_id)


def test_row1_heartbeat_object_in_a_binary_frame_is_dropped() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_binary(b'{"type":"heartbeat","seq":3}')
    assert (a.take(), b.take()) == ([], [])
    assert not of_type(h, MessageReceived)


def test_row1_heartbeat_object_with_escaped_key_is_dropped() -> None:
    """``{"\\u0074ype":"heartbeat"}`` is a JSON object whose ``type`` is ``"heartbeat"`` (Go's
    json.Unmarshal decodes the key to ``type`` and the reference drops it)."""
    h = make()
    a, b, _ = three(h)
    a.send_text('{"\\u0074ype":"heartbeat"}')
    assert b.take() == []


def test_row1_nan_is_not_json_so_the_message_is_relayed() -> None:
    """``NaN`` is not JSON (RFC 8259; Go's json.Unmarshal rejects it), so this is no heartbeat
    object: it is case 4 and must be relayed."""
    h = make()
    a, b, _ = three(h)
    text = '{"type":"heartbeat","x":NaN}'
    a.send_text(text)
    assert b.take() == [text]


def test_row1_utf16_bytes_are_not_a_json_object() -> None:
    """A text message whose bytes happen to be UTF-16-LE of a heartbeat object is valid UTF-8
    (ASCII and NULs) but is not JSON; it must be relayed, never sniffed as UTF-16."""
    h = make()
    a, b, _ = three(h)
    text = '{"type":"heartbeat","\u7974\u6570":1}'.encode("utf-16-le").decode("utf-8")
    a.send_text(text)
    assert b.take() == [text]


@pytest.mark.parametrize(
    "text",
    [
        "heartbeat",
        '"heartbeat"',
        '{"type":"Heartbeat"}',
        '{"Type":"heartbeat"}',
        '{"type":["heartbeat"]}',
        '{"type":null,"heartbeat":true}',
        '[{"type":"heartbeat"}]',
        '{"type":"heartbeat"',
        '{"type":"heartbeat"} trailing',
        "{'type':'heartbeat'}",
    ],
)
def test_row1_anything_else_that_looks_like_a_heartbeat_is_relayed(text: str) -> None:
    h = make()
    a, b, c = three(h)
    a.send_text(text)
    assert (b.take(), c.take(), a.take()) == ([text], [text], [])


def test_row1_bare_text_heartbeat_is_case_4() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("heartbeat")
    assert b.take() == ["heartbeat"]
    assert [m.data for m in of_type(h, MessageReceived)] == [b"heartbeat"]


def test_row2_sub_subscribes_and_is_not_relayed() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:news")
    assert b.take() == []
    assert h.server.engine.topics_of(a.conn_id) == {"news"}
    assert publish(h, "news", "x") == 1
    assert a.take() == ['{"topic":"news","data":"x"}']
    assert b.take() == []


@pytest.mark.parametrize(
    "text", ["SUB:x", "Sub:x", " sub:x", "\tsub:x", "\nsub:x", "sub :x", "su b:x", "sub"]
)
def test_row2_sub_prefix_is_exact_case_sensitive_and_anchored(text: str) -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text(text)
    assert b.take() == [text]
    assert h.server.engine.topics_of(a.conn_id) == frozenset()
    assert publish(h, "x", "d") == 0


@pytest.mark.parametrize(
    "topic", ["", "a:b", ":", "sub:x", "unsub:y", "新闻", " spaced ", "{\"type\":\"heartbeat\"}", "a\nb"]
)
def test_row2_topic_is_the_rest_of_the_text_verbatim(topic: str) -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:" + topic)
    assert b.take() == []
    assert h.server.engine.topics_of(a.conn_id) == {topic}
    assert [e.topic for e in of_type(h, TopicSubscribed)] == [topic]
    assert publish(h, topic, "d") == 1
    assert [json.loads(m) for m in a.take()] == [{"topic": topic, "data": "d"}]


def test_row2_sub_in_a_binary_frame_subscribes() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_binary(b"sub:bin")
    assert b.take() == []
    assert publish(h, "bin", "x") == 1


def test_row2_repeated_sub_is_idempotent() -> None:
    h = make()
    a, _, _ = three(h)
    for _ in range(5):
        a.send_text("sub:news")
    assert len(of_type(h, TopicSubscribed)) == 1
    assert h.server.stats().topics == {"news": 1}
    assert publish(h, "news", "once") == 1
    assert a.take() == ['{"topic":"news","data":"once"}']
    a.send_text("unsub:news")  # one unsub undoes any number of subs
    assert publish(h, "news", "gone") == 0
    assert h.server.stats().topics == {}


def test_row3_unsub_removes_the_subscription() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:news")
    b.send_text("sub:news")
    a.send_text("unsub:news")
    assert [(e.user_id, e.topic) for e in of_type(h, TopicUnsubscribed)] == [("a", "news")]
    assert publish(h, "news", "x") == 1
    assert (a.take(), b.take()) == ([], ['{"topic":"news","data":"x"}'])


@pytest.mark.parametrize("text", ["unsub:never", "unsub:", "unsub:a:b", "unsub:news"])
def test_row3_unsub_of_an_unknown_topic_is_a_no_op(text: str) -> None:
    h = make()
    a, b, c = three(h)
    b.send_text("sub:news")  # someone else's subscription is untouched
    a.send_text(text)
    assert (a.take(), b.take(), c.take()) == ([], [], [])
    assert not of_type(h, TopicUnsubscribed)
    assert h.server.engine.is_open(a.conn_id)
    assert h.server.stats().topics == {"news": 1}


def test_row3_unsub_prefix_is_case_sensitive() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:x")
    a.send_text("UNSUB:x")
    assert b.take() == ["UNSUB:x"]
    assert h.server.engine.topics_of(a.conn_id) == {"x"}


@pytest.mark.parametrize(
    "text",
    [
        "hello all",
        "",
        "héllo 🚀 \u2028 \x00 end",
        '{"topic":"news","data":"forged"}',
        "x" * 70000,
        "Server is shutting down",
    ],
)
def test_row4_relayed_byte_for_byte_to_every_other_client_never_the_sender(text: str) -> None:
    h = make()
    a, b, c = three(h)
    b.send_text("sub:news")  # subscriptions do not matter for relays
    before_b, before_c = len(data_frames(b)), len(data_frames(c))
    a.send_text(text)
    expected = text_frame(text.encode())
    for peer, before in ((b, before_b), (c, before_c)):
        frames = data_frames(peer)[before:]
        assert len(frames) == 1
        assert (frames[0].opcode, frames[0].fin, frames[0].payload) == (TEXT, True, text.encode())
        assert bytes(peer.transport.written).endswith(expected)
    assert a.take() == []
    assert [m.data for m in of_type(h, MessageReceived)] == [text.encode()]


def test_row4_binary_valid_utf8_is_relayed_as_a_text_frame() -> None:
    h = make()
    a, b, _ = three(h)
    payload = "café ✓".encode()
    a.send_binary(payload)
    frames = data_frames(b)
    assert frames[-1] == Frame(TEXT, True, 0, False, payload)
    assert b.messages[-1] == "café ✓"


@pytest.mark.parametrize("payload", [b"\xff", b"caf\xe9", b"\xed\xa0\x80", b"ok\xc3"])
def test_row4_binary_invalid_utf8_is_dropped_and_the_connection_stays(payload: bytes) -> None:
    h = make()
    a, b, c = three(h)
    a.send_binary(payload)
    assert (b.take(), c.take(), a.take()) == ([], [], [])
    assert close_frame(a) is None and h.server.engine.is_open(a.conn_id)
    assert h.server.stats().messages_dropped == 1
    assert not of_type(h, MessageReceived)
    a.send_text("still here")
    assert b.take() == ["still here"]


def test_row4_fragmented_message_is_relayed_whole_as_one_text_frame() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_raw(a.ws.send(Message(data="part one, ", message_finished=False)))
    a.send_raw(a.ws.send(Message(data="part two, ", message_finished=False)))
    assert b.take() == []
    a.send_raw(a.ws.send(Message(data="end", message_finished=True)))
    frames = data_frames(b)
    assert frames[-1] == Frame(TEXT, True, 0, False, b"part one, part two, end")


def test_client_ping_is_answered_with_a_pong_carrying_the_same_payload() -> None:
    h = make()
    a = h.connect("a")
    a.send_ping(b"\x00payload\xff")
    assert a.transport.control  # on the control lane, never behind data
    a.read()
    assert a.pongs == [b"\x00payload\xff"]


# =========================================================================== Server to client


def test_hello_is_the_first_frame_exact_text() -> None:
    h = make()
    peer = h.connect("bob")
    frames = written_frames(peer)
    assert frames[0] == Frame(TEXT, True, 0, False, b"Hello, bob! Welcome to WebSocket server.")
    assert bytes(peer.transport.written).partition(b"\r\n\r\n")[2].startswith(
        text_frame(b"Hello, bob! Welcome to WebSocket server.")
    )


def test_topic_envelope_exact_bytes() -> None:
    h = make()
    peer = h.connect("a")
    peer.send_text("sub:news")
    assert publish(h, "news", "x") == 1
    assert data_frames(peer)[-1].payload == b'{"topic":"news","data":"x"}'
    assert bytes(peer.transport.written).endswith(text_frame(b'{"topic":"news","data":"x"}'))


def test_topic_envelope_escapes_lt_gt_amp_like_go() -> None:
    h = make()
    peer = h.connect("a")
    peer.send_text("sub:<t&>")
    publish(h, "<t&>", "<b>a & b</b>")
    payload = data_frames(peer)[-1].payload
    assert payload == (
        b'{"topic":"\\u003ct\\u0026\\u003e",'
        b'"data":"\\u003cb\\u003ea \\u0026 b\\u003c/b\\u003e"}'
    )
    assert json.loads(payload) == {"topic": "<t&>", "data": "<b>a & b</b>"}


@pytest.mark.parametrize("data", ['"quoted" \\ back', "line\nbreak\ttab", "ünïcödé 🚀", "", "{}"])
def test_topic_envelope_is_compact_json_topic_first_data_a_string(data: str) -> None:
    h = make()
    peer = h.connect("a")
    peer.send_text("sub:t")
    publish(h, "t", data)
    payload = data_frames(peer)[-1].payload
    value = json.loads(payload)
    assert value == {"topic": "t", "data": data}
    assert list(value) == ["topic", "data"]
    assert payload == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def test_publish_goes_to_subscribers_at_that_moment_in_order() -> None:
    h = make()
    a, b, c = three(h)
    a.send_text("sub:t")
    b.send_text("sub:t")
    assert publish(h, "t", "1") == 2
    b.send_text("unsub:t")
    c.send_text("sub:t")
    assert publish(h, "t", "2") == 2
    assert publish(h, "t", "3") == 2
    assert publish(h, "other", "x") == 0
    assert [json.loads(m)["data"] for m in a.take()] == ["1", "2", "3"]
    assert [json.loads(m)["data"] for m in b.take()] == ["1"]
    assert [json.loads(m)["data"] for m in c.take()] == ["2", "3"]


def test_broadcast_sends_the_raw_text_to_all_or_all_but_one() -> None:
    h = make()
    a, b, c = three(h)
    assert broadcast(h, "to all <&>") == 3
    assert broadcast(h, "not to b", exclude=b.conn_id) == 2
    assert a.take() == ["to all <&>", "not to b"]
    assert b.take() == ["to all <&>"]
    assert c.take() == ["to all <&>", "not to b"]
    assert data_frames(a)[-2].payload == b"to all <&>"


def test_every_data_frame_the_server_sends_is_a_text_frame() -> None:
    h = make()
    a, b, c = three(h)
    a.send_text("sub:t")
    b.send_binary(b"binary in")
    c.send_text("text in")
    publish(h, "t", "published")
    broadcast(h, "broadcast")
    h.advance(5.0)  # text heartbeat
    for peer in (a, b, c):
        peer.read()  # answer the Pings before the Close arrives
    acts = h.server.send(a.conn_id, "direct", **at(h))
    h.apply(acts)
    h.apply(h.server.shutdown(**at(h)))
    for peer in (a, b, c):
        frames = written_frames(peer)
        data = [f for f in frames if f.opcode not in (PING, PONG, CLOSE)]
        assert data and all(f.opcode == TEXT and f.fin and f.rsv == 0 for f in data), frames
        assert not any(f.masked for f in frames)
    assert a.take() == [
        "binary in",
        "text in",
        '{"topic":"t","data":"published"}',
        "broadcast",
        "heartbeat",
        "direct",
        "Server is shutting down",
    ]


def test_shutdown_says_goodbye_then_closes_1001_after_pending_output() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:t")
    publish(h, "t", "pending")  # not yet flushed when shutdown begins
    h.apply(h.server.shutdown(**at(h)))
    assert a.take() == ['{"topic":"t","data":"pending"}', "Server is shutting down"]
    assert b.take() == ["Server is shutting down"]
    frames = written_frames(a)
    assert frames[-2].payload == b"Server is shutting down"
    assert frames[-1].opcode == CLOSE and code_of(a) == 1001
    assert a.close is not None and a.close.code == 1001
    # No new WebSocket while shutting down.
    _, answer = raw(h, upgrade_request())
    assert answer.status != 101


def test_shutdown_finishes_once_everyone_answered_or_after_close_timeout() -> None:
    h = make()
    a, b, _ = three(h)
    h.apply(h.server.shutdown(**at(h)))
    a.read()
    a.send_close(1001)
    assert not h.server.finished
    h.advance(h.config.close_timeout - EPS)
    assert not h.server.finished
    h.advance(EPS)
    assert h.server.finished
    assert h.transports[a.conn_id].state in ("closing", "closed")
    assert h.transports[b.conn_id].state == "aborted"
    assert sorted(d.code for d in of_type(h, ClientDisconnected)) == [1001, 1001, 1001]


def test_text_heartbeat_every_interval() -> None:
    h = make()
    peer = h.connect("a")
    peer.take()
    # Pings (and text heartbeats) due within the engine's ping window share one tick.
    window = h.server.engine.ping_window
    h.advance(5.0 - window - EPS)
    assert peer.take() == []
    h.advance(EPS)
    assert peer.take() == ["heartbeat"]
    h.advance(5.0)
    h.advance(5.0)
    assert peer.take() == ["heartbeat", "heartbeat"]


def test_text_heartbeat_can_be_disabled_pings_remain() -> None:
    h = make(text_heartbeat=False)
    peer = h.connect("a")
    peer.take()
    for _ in range(4):
        h.advance(5.0)
        assert peer.take() == []
    assert len(peer.pings) == 4
    assert h.server.engine.is_open(peer.conn_id)


def test_events_never_reach_the_wire() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:x")
    a.send_text("unsub:x")
    a.send_binary(b"\xff")
    b.vanish()
    h.advance(5.0)
    for message in a.take():
        assert "event_type" not in message and '"code"' not in message, message


# =========================================================================== Heartbeat


def test_heartbeat_defaults() -> None:
    config = ServerConfig()
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (5.0, 15.0)
    assert config.close_timeout == 2.0
    assert config.text_heartbeat is True
    assert config.max_message_size == 1_048_576
    assert config.max_outbox_bytes == 4 * 1_048_576


def test_ping_every_interval_on_each_connections_own_phase() -> None:
    h = make()
    a = h.connect("a")
    h.advance(2.0)
    b = h.connect("b")
    window = h.server.engine.ping_window  # pings due within it share one tick
    h.advance(3.0 - window - EPS)
    a.read(), b.read()
    assert (a.pings, b.pings) == ([], [])
    h.advance(EPS)  # a's first interval (its ping window)
    a.read(), b.read()
    assert (len(a.pings), len(b.pings)) == (1, 0)
    h.advance(2.0)  # b's first interval
    a.read(), b.read()
    assert (len(a.pings), len(b.pings)) == (1, 1)
    h.advance(10.0)
    a.read(), b.read()
    assert (len(a.pings), len(b.pings)) == (3, 3)
    assert len(set(a.pings + b.pings)) == 6  # every tick's Ping has its own payload
    assert h.server.stats().pings_sent == 6
    assert h.server.stats().pongs_received == 6  # FakePeer answers automatically


def test_silence_closes_1011_heartbeat_timeout_and_not_a_moment_before() -> None:
    h = make()
    peer = silent(h)
    h.advance(15.0 - EPS)
    assert close_frame(peer) is None
    assert h.server.engine.is_open(peer.conn_id)
    h.advance(EPS)
    assert close_code(close_frame(peer)) == (1011, "heartbeat timeout")
    assert not h.server.engine.is_open(peer.conn_id)
    assert h.server.stats().heartbeat_timeouts == 1


def test_heartbeat_timeout_is_configurable() -> None:
    h = make(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    peer = silent(h)
    h.advance(3.0 - EPS)
    assert close_frame(peer) is None
    h.advance(EPS)
    assert close_code(close_frame(peer)) == (1011, "heartbeat timeout")


def _send_life(peer: FakePeer, kind: str) -> None:
    match kind:
        case "ping":
            peer.send_ping(b"alive?")
        case "pong":
            peer.read()
            assert peer.pings
            peer.send_raw(peer.ws.send(Pong(payload=peer.pings[-1])))
        case "unsolicited pong":
            peer.send_raw(peer.ws.send(Pong(payload=b"whatever")))
        case "data":
            peer.send_text("some relay")
        case "heartbeat object":
            peer.send_text('{"type":"heartbeat"}')
        case "sub":
            peer.send_text("sub:t")
        case "half a frame":
            peer.send_raw(peer.ws.send(Message(data="x" * 50))[:3])
        case _:
            raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["ping", "pong", "unsolicited pong", "data", "heartbeat object", "sub", "half a frame"]
)
def test_any_frame_from_the_peer_counts_as_life(kind: str) -> None:
    h = make()
    peer = silent(h)
    h.advance(10.0)
    _send_life(peer, kind)
    h.advance(15.0 - EPS)  # 25 - EPS after connecting: 15 - EPS since the sign of life
    assert close_frame(peer) is None
    assert h.server.engine.is_open(peer.conn_id)
    h.advance(EPS)
    assert close_code(close_frame(peer)) == (1011, "heartbeat timeout")


def test_pong_answering_our_ping_gives_an_rtt_sample_in_stats() -> None:
    h = make()
    peer = h.connect("a")
    peer.auto_pong = False
    h.advance(5.0)
    h.advance(0.25)
    peer.read()
    peer.send_raw(peer.ws.send(Pong(payload=peer.pings[-1])))
    assert h.server.stats().rtt == {peer.conn_id: 0.25}
    assert h.server.engine.rtt_of(peer.conn_id) == 0.25
    stats = json.loads(h.http("GET", "/api/stats").body)
    assert stats["rtt"] == {str(peer.conn_id): 0.25}
    # A later sample replaces it: the server keeps the latest one.
    h.advance(4.75)
    h.advance(0.5)
    peer.read()
    peer.send_raw(peer.ws.send(Pong(payload=peer.pings[-1])))
    assert h.server.stats().rtt == {peer.conn_id: 0.5}


def test_a_pong_that_answers_no_ping_of_ours_gives_no_rtt() -> None:
    h = make()
    peer = h.connect("a")
    peer.send_raw(peer.ws.send(Pong(payload=b"unsolicited")))
    assert h.server.stats().rtt == {}
    assert h.server.stats().pongs_received == 1


@pytest.mark.parametrize(
    ("interval", "timeout", "field"),
    [
        (0, 15, "heartbeat_interval"),
        (-1.0, 15, "heartbeat_interval"),
        (5, 5, "heartbeat_timeout"),
        (5, 4.9, "heartbeat_timeout"),
        (5, 0, "heartbeat_timeout"),
    ],
)
def test_interval_must_be_positive_and_timeout_above_it(
    interval: float, timeout: float, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        ServerConfig(heartbeat_interval=interval, heartbeat_timeout=timeout)


def test_our_own_lateness_gives_a_grace_before_closing_for_silence() -> None:
    h = make()
    peer = silent(h)
    h.clock.advance(100.0)  # the loop was blocked: no tick for 100 s
    h.tick()
    assert close_frame(peer) is None  # bytes may sit unread in the kernel
    peer.send_text('{"type":"heartbeat"}')  # ...and indeed they did
    h.advance(1.0)
    assert close_frame(peer) is None
    h.advance(14.0)
    assert close_code(close_frame(peer)) == (1011, "heartbeat timeout")


def test_after_a_stall_a_dead_peer_is_closed_within_the_grace() -> None:
    h = make()
    peer = silent(h)
    h.clock.advance(100.0)
    h.tick()
    h.advance(1.0)  # grace is at most min(1 s, interval / 2)
    assert close_code(close_frame(peer)) == (1011, "heartbeat timeout")
    assert h.server.stats().pings_sent == 1  # after a stall: one ping, not a burst of 20


# =========================================================================== Closing


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 3000, 4000, 4999])
def test_client_close_is_echoed_with_the_same_code_then_tcp_closed(code: int) -> None:
    h = make()
    peer = h.connect("a")
    peer.send_close(code, "bye")
    assert h.close_asked(peer.conn_id)
    frame = close_frame(peer)
    assert frame is not None and frame.payload == struct.pack("!H", code)
    assert h.transports[peer.conn_id].state == "closed"
    assert [(d.code, d.reason) for d in of_type(h, ClientDisconnected)] == [(code, "bye")]
    assert h.server.engine.connection_count == 0


def test_client_close_without_status_gets_an_empty_close_back() -> None:
    """RFC 6455 §5.5.1 / PROTOCOL.md: the echo carries the same code; for a Close with no status
    code (1005, e.g. tank-websocket.js ``close()``), that is a Close with an empty body."""
    h = make()
    peer = h.connect("a")
    peer.send_raw(client_frame(CLOSE, b""))
    assert h.close_asked(peer.conn_id)
    assert [d.code for d in of_type(h, ClientDisconnected)] == [1005]
    frame = close_frame(peer)
    assert frame is not None
    assert frame.payload == b"", f"expected an empty Close body, got {frame.payload!r}"


def test_data_queued_before_the_peers_close_is_still_sent_before_the_echo() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("for b")
    b.send_raw(client_frame(CLOSE, struct.pack("!H", 1000)))
    frames = written_frames(b)
    assert [f.opcode for f in frames[-2:]] == [TEXT, CLOSE]
    assert frames[-2].payload == b"for b"


def test_after_our_close_the_peer_has_close_timeout_then_tcp_is_dropped() -> None:
    h = make()
    peer = h.connect("a")
    h.apply(h.server.close(peer.conn_id, **at(h)))
    assert close_code(close_frame(peer)) == (1000, "")
    h.advance(h.config.close_timeout - EPS)
    assert h.transports[peer.conn_id].state == "open"
    assert not of_type(h, ClientDisconnected)
    actions = h.advance(EPS)
    assert AbortTransport(conn_id=peer.conn_id) in actions
    assert h.transports[peer.conn_id].state == "aborted"
    assert [d.code for d in of_type(h, ClientDisconnected)] == [1000]


def test_after_our_close_the_peers_answer_closes_tcp() -> None:
    h = make()
    peer = h.connect("a")
    h.apply(h.server.close(peer.conn_id, 4001, "policy", **at(h)))
    peer.read()
    assert peer.close is not None and (peer.close.code, peer.close.reason) == (4001, "policy")
    peer.send_close(4001)
    assert h.close_asked(peer.conn_id)
    frames = written_frames(peer)
    assert [f.opcode for f in frames].count(CLOSE) == 1  # no second Close
    assert [(d.code, d.reason) for d in of_type(h, ClientDisconnected)] == [(4001, "policy")]
    assert peer.conn_id not in h.server.engine.scheduled_deadlines()
    assert h.server.next_deadline() is None


def test_operator_close_is_1000_after_queued_output() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:t")
    publish(h, "t", "last words")
    h.apply(h.server.close(a.conn_id, **at(h)))
    assert a.take() == ['{"topic":"t","data":"last words"}']
    assert a.close is not None and a.close.code == 1000
    assert not h.server.engine.is_open(a.conn_id)
    assert h.server.engine.is_open(b.conn_id)


def test_operator_disconnect_user_closes_every_connection_of_the_id_with_1000() -> None:
    h = make()
    one, two, other = h.connect("dup"), h.connect("dup"), h.connect("other")
    closed, actions = h.server.disconnect_user("dup", **at(h))
    h.apply(actions)
    assert closed == 2
    for peer in (one, two):
        assert close_code(close_frame(peer)) == (1000, "")
    assert close_frame(other) is None
    closed, actions = h.server.disconnect_user("nobody", **at(h))
    assert (closed, actions) == (0, [])


@pytest.mark.parametrize("code", [1004, 1005, 1006, 1015, 999, 2000, 5000])
def test_operator_close_refuses_codes_that_may_not_go_on_the_wire(code: int) -> None:
    h = make()
    peer = h.connect("a")
    with pytest.raises(LocalProtocolError, match=str(code)):
        h.server.close(peer.conn_id, code, **at(h))
    assert h.server.engine.is_open(peer.conn_id)


def test_transport_lost_without_close_is_1006() -> None:
    h = make()
    peer = h.connect("a")
    peer.vanish()
    assert [(d.code, d.user_id) for d in of_type(h, ClientDisconnected)] == [(1006, "a")]
    assert h.server.engine.connection_count == 0


# =========================================================================== Limits


def test_message_over_max_message_size_closes_1009_at_the_limit_is_fine() -> None:
    h = make(max_message_size=100)
    a, b, _ = three(h)
    a.send_text("x" * 100)
    assert b.take() == ["x" * 100]
    a.send_text("y" * 101)
    assert code_of(a) == 1009
    assert b.take() == []
    assert h.transports[a.conn_id].state in ("closing", "closed")
    assert [d.code for d in of_type(h, ClientDisconnected)] == [1009]


def test_fragmented_message_over_max_message_size_closes_1009() -> None:
    h = make(max_message_size=100)
    a, b, _ = three(h)
    for _ in range(4):
        a.send_raw(a.ws.send(Message(data="z" * 30, message_finished=False)))
    assert code_of(a) == 1009
    assert b.take() == []


def test_oversized_binary_is_refused_before_the_whole_frame_arrives() -> None:
    h = make(max_message_size=100)
    a = h.connect("a")
    header = client_frame(BINARY, b"b" * 70000)[:300]  # announces 70000 bytes, sends ~290
    a.send_raw(header)
    assert code_of(a) == 1009


@pytest.mark.parametrize(
    "frames",
    [
        [client_frame(TEXT, b"\xff")],
        [client_frame(TEXT, b"caf\xe9")],
        [client_frame(TEXT, b"\xed\xa0\x80")],  # an encoded surrogate
        [client_frame(TEXT, b"ok\xc3", fin=False), client_frame(0, b"(")],  # split, still bad
    ],
)
def test_text_frame_that_is_not_utf8_closes_1007(frames: list[bytes]) -> None:
    h = make()
    a, b, _ = three(h)
    for frame in frames:
        a.send_raw(frame)
    assert code_of(a) == 1007
    assert b.take() == []


def test_text_split_inside_a_character_across_fragments_is_fine() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_raw(client_frame(TEXT, b"ok\xc3", fin=False))
    a.send_raw(client_frame(0, b"\xa9"))
    assert b.take() == ["oké"]


PROTOCOL_ERRORS = {
    "unmasked": client_frame(TEXT, b"hi", mask=False),
    "reserved opcode 0x3": client_frame(0x3, b""),
    "reserved opcode 0x7": client_frame(0x7, b"x"),
    "reserved control opcode 0xB": client_frame(0xB, b""),
    "RSV1 without extension": client_frame(TEXT, b"x", rsv=0x40),
    "RSV3": client_frame(TEXT, b"x", rsv=0x10),
    "control frame over 125 bytes": client_frame(PING, b"p" * 126),
    "fragmented control frame": client_frame(PING, b"", fin=False),
    "continuation without a start": client_frame(0, b"x"),
    "new message inside a fragmented one": client_frame(TEXT, b"a", fin=False)
    + client_frame(TEXT, b"b"),
    "close with a 1-byte body": client_frame(CLOSE, b"\x03"),
    "close code 1005 on the wire": client_frame(CLOSE, struct.pack("!H", 1005)),
    "close code 999": client_frame(CLOSE, struct.pack("!H", 999)),
    "close code 5000": client_frame(CLOSE, struct.pack("!H", 5000)),
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


@pytest.mark.parametrize("name", list(PROTOCOL_ERRORS))
def test_malformed_frames_close_1002(name: str) -> None:
    h = make()
    a, b, _ = three(h)
    a.send_raw(PROTOCOL_ERRORS[name])
    assert code_of(a) == 1002
    assert h.close_asked(a.conn_id)
    assert b.take() == []
    assert h.server.engine.is_open(b.conn_id)


def _topic_frame_size(data: str) -> int:
    return len(text_frame(render_topic_message("t", data)))


def test_slow_consumer_closed_1008_while_others_keep_receiving() -> None:
    h = make(max_message_size=256, max_outbox_bytes=1000)
    slow, fast, other = h.connect("slow"), h.connect("fast"), h.connect("other")
    for p in (slow, fast, other):
        p.send_text("sub:t")
        p.take()
    data = [f"{i:03d}" + "d" * 72 for i in range(20)]
    size = _topic_frame_size(data[0])
    assert size == 100
    delivered = []
    for i, d in enumerate(data):
        delivered.append(publish(h, "t", d))
        fast.read()
        if i % 5 == 4:
            other.read()  # reads in bursts, keeps up
        if i == 9:
            # Ten frames of 100 bytes: exactly max_outbox_bytes, not past it.
            assert h.server.engine.is_open(slow.conn_id)
            assert h.server.engine.outbox_of(slow.conn_id) == 1000
    assert delivered == [3] * 10 + [2] * 10
    assert [json.loads(m)["data"] for m in fast.take()] == data
    assert [json.loads(m)["data"] for m in other.take()] == data
    assert close_code(close_frame(slow)) == (1008, "slow consumer")
    assert slow.take() == []  # pending data was discarded, the Close replaced it
    assert [s.user_id for s in of_type(h, SlowConsumerClosed)] == ["slow"]
    assert h.server.stats().slow_consumer_closes == 1


def test_flushed_output_makes_room_again() -> None:
    h = make(max_message_size=256, max_outbox_bytes=1000)
    peer = h.connect("a")
    peer.take()
    peer.send_text("sub:t")
    for i in range(50):
        publish(h, "t", f"{i:03d}" + "d" * 72)
        if i % 9 == 8:
            peer.read()
    assert h.server.engine.is_open(peer.conn_id)
    assert len(peer.take()) == 50


def test_control_frames_still_reach_a_connection_whose_data_lane_is_full() -> None:
    h = make(max_message_size=256, max_outbox_bytes=1000, text_heartbeat=False)
    peer = h.connect("a")
    h.apply(h.server.send(peer.conn_id, "y" * 990, **at(h)))  # 994 of 1000 bytes queued
    assert h.server.engine.outbox_of(peer.conn_id) == 994
    peer.send_ping(b"pp")
    h.advance(5.0)  # our heartbeat Ping
    transport = peer.transport
    assert [f.opcode for f in parse_frames(b"".join(transport.control))] == [PONG, PING]
    events = peer.read()
    assert peer.pongs == [b"pp"] and len(peer.pings) == 1
    # The control lane went first, ahead of the queued data.
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("Pong") < kinds.index("TextMessage")
    assert kinds.index("Ping") < kinds.index("TextMessage")
    assert h.server.engine.is_open(peer.conn_id)


@given(
    st.sampled_from(["websocket", "http"]),
    st.lists(st.binary(max_size=40), max_size=8),
    st.booleans(),
)
def test_no_byte_sequence_crashes_the_server_or_stalls_the_others(
    stage: str, chunks: list[bytes], with_valid_prefix: bool
) -> None:
    h = make(max_message_size=64)
    bystander = h.connect("bystander")
    bystander.take()
    if stage == "websocket":
        conn = h.connect("fuzzer").conn_id
        prefix = client_frame(TEXT, b"sub:t") if with_valid_prefix else b""
    else:
        conn = h.accept()
        prefix = upgrade_request()[:30] if with_valid_prefix else b""
    for chunk in [prefix, *chunks]:
        h.feed(conn, chunk)  # never raises, whatever the bytes
        h.flush(conn)
    h.advance(1.0)
    h.server.engine.check_registry()
    assert broadcast(h, "still serving", exclude=conn) == 1
    assert bystander.take()[-1:] == ["still serving"]  # (after any relays of valid frames)


# =========================================================================== HTTP API end to end


def test_api_publish_returns_the_delivered_count() -> None:
    h = make()
    a, b, c = three(h)
    a.send_text("sub:news")
    b.send_text("sub:news")
    answer = h.http("POST", "/api/publish", body=b'{"topic":"news","data":"x <y>"}')
    assert (answer.status, json.loads(answer.body)) == (200, {"delivered": 2})
    expected = '{"topic":"news","data":"x \\u003cy\\u003e"}'
    assert (a.take(), b.take(), c.take()) == ([expected], [expected], [])
    answer = h.http("POST", "/api/publish", body=b'{"topic":"none","data":"x"}')
    assert json.loads(answer.body) == {"delivered": 0}


def test_api_broadcast() -> None:
    h = make()
    a, b, c = three(h)
    answer = h.http("POST", "/api/broadcast", body=b'{"data":"hello everyone"}')
    assert (answer.status, json.loads(answer.body)) == (200, {"delivered": 3})
    assert a.take() == b.take() == c.take() == ["hello everyone"]


def test_api_disconnect_closes_every_connection_of_the_id_with_1000() -> None:
    h = make()
    one, two, other = h.connect("dup"), h.connect("dup"), h.connect("other")
    answer = h.http("POST", "/api/disconnect", body=b'{"user_id":"dup"}')
    assert (answer.status, json.loads(answer.body)) == (200, {"closed": 2})
    assert close_code(close_frame(one)) == (1000, "")
    assert close_code(close_frame(two)) == (1000, "")
    assert close_frame(other) is None
    answer = h.http("POST", "/api/disconnect", body=b'{"user_id":"dup"}')
    assert json.loads(answer.body) == {"closed": 0}


def test_api_stats_has_every_documented_key() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:x")
    b.send_text("sub:x")
    b.send_text("sub:y")
    answer = h.http("GET", "/api/stats")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    stats = json.loads(answer.body)
    required = {
        "connections",
        "topics",
        "messages_in",
        "messages_out",
        "pings_sent",
        "pongs_received",
        "heartbeat_timeouts",
        "slow_consumer_closes",
    }
    assert required <= set(stats)
    assert stats["connections"] == 3
    assert stats["topics"] == {"x": 2, "y": 1}
    assert stats["messages_in"] == 3
    assert stats["messages_out"] == 3  # three Hello frames


def test_api_metrics_is_prometheus_text() -> None:
    h = make()
    a = h.connect("a")
    a.send_text("sub:x")
    answer = h.http("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.body.decode()
    assert "# TYPE tank_connections gauge" in text
    assert re.search(r"^tank_connections 1$", text, re.M)
    assert re.search(r'^tank_topic_subscribers\{topic="x"\} 1$', text, re.M)
    for name in (
        "tank_messages_in_total",
        "tank_messages_out_total",
        "tank_pings_sent_total",
        "tank_pongs_received_total",
        "tank_heartbeat_timeouts_total",
        "tank_slow_consumer_closes_total",
    ):
        assert re.search(rf"^{name} \d+$", text, re.M), name


def test_api_healthz() -> None:
    h = make()
    answer = h.http("GET", "/healthz")
    assert (answer.status, answer.body) == (200, b"ok")
    assert h.http("GET", "/healthz", peer_host="10.0.0.1").status == 200


def test_api_key_is_required_when_configured() -> None:
    h = make(api_key="k3y")
    for method, target in (("GET", "/api/stats"), ("GET", "/metrics"), ("POST", "/api/broadcast")):
        answer = h.http(method, target, body=b'{"data":"x"}' if method == "POST" else b"")
        assert answer.status == 401, target
    answer = h.http("GET", "/api/stats", headers=[("Authorization", "apikey wrong")])
    assert answer.status == 401
    answer = h.http("GET", "/api/stats", headers=[("Authorization", "apikey k3y")], peer_host="10.0.0.1")
    assert answer.status == 200


def test_api_without_key_answers_only_loopback() -> None:
    h = make()
    for target in ("/api/stats", "/metrics"):
        assert h.http("GET", target, peer_host="10.0.0.1").status == 403
        assert h.http("GET", target, peer_host="127.0.0.1").status == 200
        assert h.http("GET", target, peer_host="::1").status == 200
    peer = h.connect("a")
    peer.send_text("sub:t")
    answer = h.http("POST", "/api/publish", body=b'{"topic":"t","data":"x"}', peer_host="10.0.0.1")
    assert answer.status == 403
    assert peer.take() == ["Hello, a! Welcome to WebSocket server."]


@pytest.mark.parametrize(
    ("target", "body", "field"),
    [
        ("/api/publish", b'{"data":"x"}', "topic"),
        ("/api/publish", b'{"topic":"t","data":1}', "data"),
        ("/api/broadcast", b"{}", "data"),
        ("/api/disconnect", b'{"user_id":null}', "user_id"),
    ],
)
def test_api_bad_field_is_400_naming_it(target: str, body: bytes, field: str) -> None:
    h = make()
    answer = h.http("POST", target, body=body)
    assert answer.status == 400
    assert field in json.loads(answer.body)["error"]


def test_api_and_websocket_share_host_and_port_other_paths_404() -> None:
    h = make()
    assert h.http("GET", "/nope").status == 404
    assert h.http("GET", "/ws").status == 400


# =========================================================================== Event codes


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _check_time(time: str, wall_time: float) -> None:
    assert RFC3339.match(time), time
    assert datetime.fromisoformat(time.replace("Z", "+00:00")).timestamp() == wall_time


def test_error_codes_are_the_references() -> None:
    assert {c.name: int(c) for c in ErrorCode} == {
        "SERIALIZATION_FAILED": 1001,
        "UPGRADE_FAILED": 1002,
        "READ_ERROR": 1003,
        "WRITE_ERROR": 1004,
        "HEARTBEAT_FAILED": 1005,
        "AUTHENTICATION_FAILED": 1007,
    }


def test_upgrade_failed_on_400() -> None:
    h = make()
    h.clock.advance(1.5)
    raw(h, upgrade_request(drop=("Sec-WebSocket-Key",)))
    errors = of_type(h, ErrorOccurred)
    assert [e.code for e in errors] == [ErrorCode.UPGRADE_FAILED]
    _check_time(errors[0].time, h.clock.wall_time)
    assert errors[0].to_json_dict() == {
        "message": errors[0].message,
        "code": 1002,
        "time": errors[0].time,
    }


def test_authentication_failed_on_401() -> None:
    h = make(authenticate=True)
    conn = h.accept()
    h.feed(conn, upgrade_request("/ws?user_id=u"))
    h.clock.advance(0.25)
    h.answer_authorization(conn, False)
    errors = of_type(h, ErrorOccurred)
    assert [e.code for e in errors] == [ErrorCode.AUTHENTICATION_FAILED]
    assert errors[0].to_json_dict()["code"] == 1007
    _check_time(errors[0].time, h.clock.wall_time)


def test_heartbeat_failed_and_heartbeat_timed_out_on_silence() -> None:
    h = make()
    peer = silent(h, "mute")
    h.advance(15.0)
    errors = of_type(h, ErrorOccurred)
    assert [(e.code, e.user_id, e.conn_id) for e in errors] == [
        (ErrorCode.HEARTBEAT_FAILED, "mute", peer.conn_id)
    ]
    timed_out = of_type(h, HeartbeatTimedOut)
    assert [(t.user_id, t.silent_for) for t in timed_out] == [("mute", 15.0)]
    _check_time(timed_out[0].time, h.clock.wall_time)
    assert h.clock.wall_time == 1_767_225_600.0 + 15.0


@pytest.mark.parametrize("name", ["unmasked", "reserved opcode 0x3", "close code 999"])
def test_read_error_on_protocol_errors(name: str) -> None:
    h = make()
    peer = h.connect("a")
    peer.send_raw(PROTOCOL_ERRORS[name])
    errors = of_type(h, ErrorOccurred)
    assert [(e.code, e.user_id) for e in errors] == [(ErrorCode.READ_ERROR, "a")]


def test_read_error_on_1007_and_1009() -> None:
    h = make(max_message_size=10)
    a, b = h.connect("a"), h.connect("b")
    a.send_raw(client_frame(TEXT, b"\xff"))
    b.send_text("x" * 11)
    assert [e.code for e in of_type(h, ErrorOccurred)] == [ErrorCode.READ_ERROR] * 2
    assert sorted(d.code for d in of_type(h, ClientDisconnected)) == [1007, 1009]


def test_notifications_for_a_whole_session() -> None:
    h = make(max_message_size=128, max_outbox_bytes=300)
    h.clock.advance(0.5)
    a = h.connect("alice")
    b = h.connect("bob")
    connected = of_type(h, ClientConnected)
    assert [(c.user_id, c.conn_id, c.peer_host) for c in connected] == [
        ("alice", a.conn_id, "127.0.0.1"),
        ("bob", b.conn_id, "127.0.0.1"),
    ]
    _check_time(connected[0].time, h.clock.wall_time)
    h.clock.advance(0.25)
    a.send_text("sub:news")
    a.send_text("sub:news")
    a.send_text("unsub:news")
    a.send_text("unsub:news")
    a.send_text("hi bob")
    subs, unsubs = of_type(h, TopicSubscribed), of_type(h, TopicUnsubscribed)
    assert [(s.user_id, s.topic) for s in subs] == [("alice", "news")]
    assert [(u.user_id, u.topic) for u in unsubs] == [("alice", "news")]
    received = of_type(h, MessageReceived)
    assert [(m.user_id, m.text) for m in received] == [("alice", "hi bob")]
    times = [e.time for e in subs] + [e.time for e in unsubs] + [e.time for e in received]
    for time in times:
        _check_time(time, h.clock.wall_time)
    # bob stops reading: slow consumer.
    for _ in range(5):
        h.apply(h.server.broadcast("z" * 80, exclude=a.conn_id, **at(h))[1])
    slow = of_type(h, SlowConsumerClosed)
    assert [(s.user_id, s.conn_id) for s in slow] == [("bob", b.conn_id)]
    b.read()
    b.send_close(1008)
    a.send_close(1000)
    gone = of_type(h, ClientDisconnected)
    assert [(d.user_id, d.code) for d in gone] == [("bob", 1008), ("alice", 1000)]
    for event in gone:
        _check_time(event.time, h.clock.wall_time)


# =========================================================================== tank-websocket.js 2.0.3


def test_js_reconnect_burst_with_repeated_subs_is_idempotent() -> None:
    h = make()
    topics = ["news", "chat:1", ""]
    peers = []
    for attempt in range(10):  # a restart meets a burst of reconnects with the same user_id
        peer = h.connect("browser")
        for _ in range(3):  # broken dedupe: the same sub:T several times in a row
            for topic in topics:
                peer.send_text("sub:" + topic)
        peers.append(peer)
        if attempt < 9:
            peer.vanish()  # the page dropped this one and reconnected
    last = peers[-1]
    assert h.server.engine.open_connections() == (last.conn_id,)
    assert h.server.engine.topics_of(last.conn_id) == set(topics)
    assert h.server.stats().topics == dict.fromkeys(topics, 1)
    for topic in topics:
        assert publish(h, topic, "x") == 1
    assert [json.loads(m)["topic"] for m in last.take()[1:]] == topics


def test_js_unsub_of_never_subscribed_topics_then_close_without_status() -> None:
    h = make()
    a, b, _ = three(h)
    a.send_text("sub:kept")
    for topic in ("kept", "never", "also-never"):  # destroyTopics()/close()
        a.send_text("unsub:" + topic)
    assert [u.topic for u in of_type(h, TopicUnsubscribed)] == ["kept"]
    assert b.take() == []
    a.send_raw(client_frame(CLOSE, b""))  # close(): no status code
    assert h.close_asked(a.conn_id)
    assert [(d.user_id, d.code) for d in of_type(h, ClientDisconnected)] == [("a", 1005)]
    assert h.server.engine.connection_count == 2
    assert close_code(close_frame(a)) == (1005, "")  # what the browser reports as the close code


def test_js_client_sees_topic_messages_only_for_topic_envelopes() -> None:
    h = make()
    a, _, _ = three(h)
    a.send_text("sub:news")
    publish(h, "news", "d")
    broadcast(h, "plain")
    h.advance(5.0)
    for message in a.take():
        assert isinstance(message, str)
        index = message.find("topic")
        if message.startswith("{"):
            assert index > 0 and json.loads(message)["topic"] == "news"
        else:
            assert index == -1  # never mistaken for a topic message by the JS client
