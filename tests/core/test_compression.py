"""permessage-deflate in the core (RFC 7692): negotiation, compress once per window, bounded inflate.

Reference implementations: wsproto's ``PerMessageDeflate`` (the client side of every negotiation
and the decoder of our frames) and plain zlib.
"""

from __future__ import annotations

import itertools
import json
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, RsvBits

from tank_core import ServerConfig
from tank_core.server.reports import metrics_response
from tank_core.testing import FakeClock, Harness
from tank_core.testing.peer import FakePeer
from tank_core.wire.deflate import DeflateExtension, MessageDeflater
from tank_core.wire.deflate_offer import DeflateParams, negotiate, parse_extensions, read_response
from tank_core.wire.frames import compressed_text_frame

JSON_LIKE = json.dumps({"symbol": "EURUSD", "bid": 1.0842, "ask": 1.0843, "levels": list(range(40))})


def make(**config: Any) -> Harness:
    return Harness(ServerConfig(**config), clock=FakeClock(1000.0))


def extension_header(h: Harness, peer: FakePeer) -> str | None:
    """The ``Sec-WebSocket-Extensions`` the server answered ``peer`` with (None: none)."""
    head = bytes(peer.transport.written).partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-extensions":
            return value.strip()
    return None


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each unmasked frame the server wrote."""
    out = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1] & 0x7F
        head = 2
        if second == 126:
            second, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif second == 127:
            second, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        out.append((first, data[pos + head : pos + head + second]))
        pos += head + second
    return out


def inflate_alone(payload: bytes, window: int = 15) -> bytes:
    """RFC 7692 §7.2.2 with a fresh inflater: what a peer that keeps no context reads."""
    inflater = zlib.decompressobj(-window)
    return inflater.decompress(payload + b"\x00\x00\xff\xff") + inflater.flush()


# ------------------------------------------------------------------------------ negotiation

WSPROTO_OFFERS = [
    PerMessageDeflate(
        client_no_context_takeover=cnct,
        server_no_context_takeover=snct,
        client_max_window_bits=cbits,
        server_max_window_bits=sbits,
    )
    for cnct, snct, cbits, sbits in itertools.product(
        (False, True), (False, True), (None, 9, 12, 15), (None, 9, 11, 15)
    )
]


@pytest.mark.parametrize("offer", WSPROTO_OFFERS, ids=repr)
def test_every_offer_wsproto_makes_is_agreed_and_the_messages_read(offer: PerMessageDeflate) -> None:
    h = make()
    subscriber = h.connect("s", extensions=[offer])
    accepted = [e for e in subscriber.ws.events()]  # already read by connect
    assert accepted == []
    answer = extension_header(h, subscriber)
    assert answer is not None and answer.startswith("permessage-deflate")
    assert "server_no_context_takeover" in answer
    assert offer.server_no_context_takeover  # wsproto's finalize took our answer
    subscriber.send_text("sub:t")
    h.server.publish("t", JSON_LIKE, now=h.now, wall_time=h.clock.wall_time)
    assert subscriber.take()[-1] == json.dumps({"topic": "t", "data": JSON_LIKE}, separators=(",", ":"))
    assert h.server.stats().compressed_connections == 1


def test_the_first_offer_we_can_honour_is_taken_and_an_8_bit_window_is_declined() -> None:
    values = ["permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits"]
    agreed = negotiate(values)
    assert agreed == (
        DeflateParams(server_window=15, client_window=15),
        "permessage-deflate; server_no_context_takeover",
    )
    assert negotiate(["permessage-deflate; server_max_window_bits=8"]) is None


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits",  # needs a value
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=010",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; x_unknown",
        'permessage-deflate; client_max_window_bits="1',
        "permessage-deflate; =5",
        "permessage-deflate;;",
        "x-webkit-deflate-frame",
    ],
)
def test_a_malformed_offer_is_declined_and_the_upgrade_still_succeeds(offer: str) -> None:
    assert negotiate([offer]) is None
    h = make()
    peer = h.connect("p", headers=[("Sec-WebSocket-Extensions", offer)])
    assert peer.accepted and extension_header(h, peer) is None
    assert h.server.stats().compressed_connections == 0


def test_quoted_values_and_case_are_read() -> None:
    agreed = negotiate(['Permessage-Deflate; Server_Max_Window_Bits="10"; client_max_window_bits'])
    assert agreed is not None
    assert agreed[0].server_window == 10
    assert agreed[1] == "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"


@given(st.lists(st.text(max_size=60), max_size=3))
def test_negotiation_never_raises_on_any_header(values: list[str]) -> None:
    agreed = negotiate(values)
    if agreed is not None:
        params, answer = agreed
        assert 9 <= params.server_window <= 15
        assert read_response(answer) is not None  # our answer is one we would read ourselves
    parse_extensions(values)


@given(st.lists(st.text(alphabet="permssag-dflt_ovcxwinbu;=,\" 0123456789", max_size=80),
                max_size=2))
def test_the_handshake_never_fails_for_an_offer(values: list[str]) -> None:
    h = make()
    headers = [("Sec-WebSocket-Extensions", v) for v in values if v and v == v.strip()]
    peer = h.connect("p", headers=headers)
    assert peer.accepted


def test_compression_off_answers_plain() -> None:
    h = make(compression=False)
    peer = h.connect("p", extensions=[PerMessageDeflate()])
    assert peer.accepted and extension_header(h, peer) is None


def test_read_response_rejects_what_a_server_may_not_answer() -> None:
    assert read_response("permessage-deflate; client_max_window_bits") is None
    assert read_response("permessage-deflate; bogus") is None
    assert read_response("other") is None
    params = read_response("permessage-deflate; server_max_window_bits=10")
    assert params == DeflateParams(server_window=10, server_no_context_takeover=False)


# ------------------------------------------------------------------------------ sending


@given(st.lists(st.text(max_size=3000), min_size=1, max_size=6), st.sampled_from([9, 12, 15]))
def test_each_message_inflates_alone_and_with_wsproto(texts: list[str], window: int) -> None:
    deflater = MessageDeflater(window)
    client = PerMessageDeflate()
    client.finalize(f"permessage-deflate; server_no_context_takeover; server_max_window_bits={window}")
    proto = FrameProtocol(client=True, extensions=[client])
    for text in texts:
        payload = text.encode("utf-8", "surrogatepass")
        data = deflater.compress(payload)
        if data is None:
            continue  # not smaller: sent plain
        assert len(data) < len(payload)
        assert inflate_alone(data, window) == payload
        proto.receive_bytes(compressed_text_frame(data))
        (frame,) = list(proto.received_frames())
        assert frame.payload == text  # wsproto hands text messages over as str


@given(st.text(min_size=200, max_size=5000), st.data())
def test_our_compressed_frames_read_the_same_split_anywhere(text: str, data: st.DataObject) -> None:
    h = make(compression_threshold=0)
    subscriber = h.connect("s", extensions=[PerMessageDeflate()])
    subscriber.send_text("sub:t")
    h.server.publish("t", text, now=h.now, wall_time=h.clock.wall_time)
    written = h.flush(subscriber.conn_id)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(written)), max_size=5)))
    edges = [0, *cuts, len(written)]
    for a, b in itertools.pairwise(edges):
        subscriber.ws.receive_data(written[a:b])
        for event in subscriber.ws.events():
            if isinstance(event, TextMessage):
                subscriber._collect(event.data, event.message_finished)
    assert subscriber.messages[-1] == json.dumps(
        {"topic": "t", "data": text}, separators=(",", ":"), ensure_ascii=False
    ).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def test_one_compressed_frame_is_shared_and_plain_peers_get_the_plain_one() -> None:
    h = make()
    zipped = [h.connect(f"z{i}", extensions=[PerMessageDeflate()]) for i in range(3)]
    small_window = h.connect("w", extensions=[PerMessageDeflate(server_max_window_bits=10)])
    plain = [h.connect(f"p{i}") for i in range(2)]
    for peer in [*zipped, small_window, *plain]:
        peer.send_text("sub:t")
    since = len(h.output_log)
    h.server.publish("t", JSON_LIKE, now=h.now, wall_time=h.clock.wall_time)
    stats = h.server.stats()
    assert stats.messages_compressed == 2  # once for window 15, once for window 10
    chunks = {
        peer.conn_id: h.server._outputs.by_id[peer.conn_id].data[-1]
        for peer in [*zipped, small_window, *plain]
    }
    assert chunks[zipped[0].conn_id] is chunks[zipped[1].conn_id] is chunks[zipped[2].conn_id]
    assert chunks[plain[0].conn_id] is chunks[plain[1].conn_id]
    assert chunks[zipped[0].conn_id][0] == 0xC1 and chunks[plain[0].conn_id][0] == 0x81
    assert len(chunks[zipped[0].conn_id]) < len(chunks[plain[0].conn_id]) * 0.75
    logged = [q for q in h.output_log[since:] if getattr(q, "data", b"")[:1] == b"\xc1"]
    assert {c for q in logged for c in q.conn_ids} == {p.conn_id for p in [*zipped, small_window]}
    for peer in [*zipped, small_window, *plain]:
        assert json.loads(str(peer.take()[-1]))["data"] == JSON_LIKE
    saved = 3 * (len(chunks[plain[0].conn_id]) - len(chunks[zipped[0].conn_id]))
    saved += len(chunks[plain[0].conn_id]) - len(chunks[small_window.conn_id])
    assert h.server.stats().compression_bytes_saved == saved


def test_short_and_incompressible_messages_go_plain() -> None:
    h = make(compression_threshold=64)
    peer = h.connect("z", extensions=[PerMessageDeflate()])
    peer.send_text("sub:t")
    h.flush(peer.conn_id)
    h.server.publish("t", "short", now=h.now, wall_time=h.clock.wall_time)
    noise = bytes(range(256)).hex()[:300]  # hex digits: compresses a little at best
    h.server.publish("t", "x" * 500, now=h.now, wall_time=h.clock.wall_time)
    firsts = [first for first, _ in frames_of(h.flush(peer.conn_id))]
    assert firsts == [0x81, 0xC1]
    assert h.server.stats().messages_compressed == 1
    assert noise  # the threshold, not the content, kept "short" plain


def test_the_outbox_counts_compressed_bytes_and_drains_to_zero() -> None:
    h = make(max_message_size=10_000, max_outbox_bytes=20_000)
    peer = h.connect("z", extensions=[PerMessageDeflate()])
    peer.send_text("sub:t")
    h.flush(peer.conn_id)
    for _ in range(50):  # 50 x ~1 KiB plain would exceed 20 kB; compressed it does not
        h.server.publish("t", JSON_LIKE, now=h.now, wall_time=h.clock.wall_time)
    assert h.server.engine.is_open(peer.conn_id)
    assert 0 < h.server.stats().outbox_bytes < 20_000
    h.flush(peer.conn_id)
    assert h.server.stats().outbox_bytes == 0


def test_a_send_to_one_connection_is_compressed_too() -> None:
    h = make()
    peer = h.connect("z", extensions=[PerMessageDeflate()])
    h.flush(peer.conn_id)
    h.server.send(peer.conn_id, JSON_LIKE, now=h.now, wall_time=h.clock.wall_time)
    ((first, _),) = frames_of(h.flush(peer.conn_id))
    assert first == 0xC1


def test_compression_shows_in_the_metrics() -> None:
    h = make()
    peer = h.connect("z", extensions=[PerMessageDeflate()])
    peer.send_text("sub:t")
    h.server.publish("t", JSON_LIKE, now=h.now, wall_time=h.clock.wall_time)
    text = metrics_response(h.server.stats()).body.decode()
    assert "tank_compressed_connections 1" in text
    assert "tank_messages_compressed_total 1" in text
    peer.vanish()
    assert h.server.stats().compressed_connections == 0


# ------------------------------------------------------------------------------ receiving


@given(st.lists(st.text(min_size=1, max_size=2000), min_size=1, max_size=5), st.data())
def test_compressed_messages_with_context_are_relayed_split_anywhere(
    texts: list[str], data: st.DataObject
) -> None:
    h = make()
    sender = h.connect("a", extensions=[PerMessageDeflate()])
    receiver = h.connect("b")
    wire = b"".join(sender.ws.send(__import__("wsproto").events.Message(data=t)) for t in texts)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6)))
    for a, b in itertools.pairwise([0, *cuts, len(wire)]):
        if b > a:
            sender.send_raw(wire[a:b])
    h.turns()
    expected = [t for t in texts if not t.startswith(("sub:", "unsub:")) and "heartbeat" not in t]
    got = [m for m in receiver.take() if not str(m).startswith("Hello")]
    assert [m for m in got if "heartbeat" not in str(m)] == expected


def bomb(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(b"\0" * size) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]


def masked_frame(first: int, payload: bytes, key: bytes = b"abcd") -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = bytes((first, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_of(h: Harness, peer: FakePeer) -> tuple[int, str]:
    peer.read()
    assert peer.close is not None
    return int(peer.close.code), peer.close.reason


def test_a_deflate_bomb_is_closed_1009_having_inflated_at_most_the_limit() -> None:
    h = make(max_message_size=1 << 20)
    peer = h.connect("bomber", extensions=[PerMessageDeflate()])
    payload = bomb(10_000_000)  # 10 MB of zeros in about 10 kB
    assert len(payload) < 20_000
    seen: list[int] = []
    wire = h.server._wires[peer.conn_id]
    assert wire.deflate is not None
    original = wire.deflate._inflate

    def counting(data: bytes, client: bool) -> Any:
        out = original(data, client)
        if isinstance(out, bytes):
            seen.append(len(out))
        return out

    wire.deflate._inflate = counting  # type: ignore[method-assign]
    frame = masked_frame(0xC1, payload)
    for i in range(0, len(frame), 1000):
        peer.send_raw(frame[i : i + 1000])
    h.turns()
    assert close_of(h, peer) == (1009, "message larger than 1048576 bytes")
    assert sum(seen) <= (1 << 20) + 1


def test_bad_compressed_data_is_1007_and_rsv1_in_the_wrong_place_1002() -> None:
    h = make()
    a = h.connect("a", extensions=[PerMessageDeflate()])
    a.send_raw(masked_frame(0xC1, b"\xff\xff\xff\xff"))
    assert close_of(h, a)[0] == 1007
    b = h.connect("b", extensions=[PerMessageDeflate()])
    b.send_raw(masked_frame(0xC9, b"x"))  # a Ping with RSV1
    assert close_of(h, b) == (1002, "RSV1 set on a control frame")
    c = h.connect("c", extensions=[PerMessageDeflate()])
    c.send_raw(masked_frame(0x41, b"abc") + masked_frame(0xC0, b"def"))  # RSV1 on continuation
    assert close_of(h, c) == (1002, "RSV1 set on a continuation frame")
    d = h.connect("d")  # no deflate agreed: RSV1 is a protocol error (RFC 6455 §5.2)
    d.send_raw(masked_frame(0xC1, bomb(100)))
    assert close_of(h, d)[0] == 1002


def test_a_ping_between_fragments_of_a_compressed_message_keeps_it_whole() -> None:
    h = make()
    sender = h.connect("a", extensions=[PerMessageDeflate()])
    receiver = h.connect("b")
    text = "hello " * 200
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = (compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    half = len(data) // 2
    sender.send_raw(
        masked_frame(0x41, data[:half]) + masked_frame(0x89, b"p") + masked_frame(0x80, data[half:])
    )
    assert receiver.take()[-1] == text
    sender.take()
    assert sender.pongs == [b"p"] and h.server.engine.is_open(sender.conn_id)


def test_client_no_context_takeover_keeps_no_inflater_between_messages() -> None:
    h = make()
    peer = h.connect("a", extensions=[PerMessageDeflate(client_no_context_takeover=True)])
    assert "client_no_context_takeover" in (extension_header(h, peer) or "")
    peer.send_text("x" * 1000)
    wire = h.server._wires[peer.conn_id]
    assert wire.deflate is not None and wire.deflate._inflater is None


# ------------------------------------------------------------------------------ the client side


def test_the_client_extension_offers_reads_the_answer_and_compresses() -> None:
    ext = DeflateExtension(max_message_size=1000, threshold=10)
    assert not ext.enabled()
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="h", target="/ws", extensions=[ext]))
    assert b"permessage-deflate; client_max_window_bits" in request
    ext.finalize("permessage-deflate; server_no_context_takeover; client_max_window_bits=10")
    assert ext.enabled() and ext.params == DeflateParams(
        server_window=15, client_window=10, server_no_context_takeover=True
    )
    proto = FrameProtocol(client=True, extensions=[ext])
    rsv, out = ext.frame_outbound(proto, Opcode.TEXT, RsvBits(False, False, False), b"a" * 100, True)
    assert rsv.rsv1 and inflate_alone(out, 10) == b"a" * 100
    rsv, out = ext.frame_outbound(proto, Opcode.TEXT, RsvBits(False, False, False), b"short", True)
    assert not rsv.rsv1 and out == b"short"
    with pytest.raises(Exception, match="malformed permessage-deflate answer"):
        DeflateExtension(max_message_size=10).finalize("permessage-deflate; nonsense")


def test_the_client_inflates_within_its_limit() -> None:
    ext = DeflateExtension(max_message_size=1000)
    ext.finalize("permessage-deflate; server_no_context_takeover")
    proto = FrameProtocol(client=True, extensions=[ext])
    proto.receive_bytes(bytes([0xC1, len(bomb(5000))]) + bomb(5000))
    with pytest.raises(Exception) as failed:
        list(proto.received_frames())
    assert getattr(failed.value, "code", None) == CloseReason.MESSAGE_TOO_BIG


def test_accept_connection_carries_our_extension_for_a_wsproto_client() -> None:
    h = make()
    offer = PerMessageDeflate()
    peer = FakePeer(h)
    peer.send_raw(peer.ws.send(Request(host="tank.test", target="/ws", extensions=[offer])))
    accepts = [e for e in peer.read() if isinstance(e, AcceptConnection)]
    assert accepts and accepts[0].extensions == [offer]
