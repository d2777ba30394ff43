"""The fast path (tank_core/wire/fastpath.py) must be invisible: for any frames in any chunks, the
server does exactly what it does when every frame goes through wsproto."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tank_core.server.websocket as server_module
from tank_core import ServerConfig
from tank_core.testing import Harness
from tank_core.wire.fastpath import OP_PING, OP_PONG, OP_TEXT, next_frame


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
    mask: bytes = b"\x01\x02\x03\x04", long_form: bool = False,
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126 and not long_form:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


texts = st.one_of(
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"sub:t", b"unsub:t", b'{"type":"heartbeat"}', b"heartbeat", b"\xff\xfe"]),
    st.binary(max_size=8),
    st.integers(126, 300).map(lambda n: b"x" * n),
)

frames = st.one_of(
    st.builds(lambda p: client_frame(OP_TEXT, p), texts),
    st.builds(lambda p: client_frame(OP_PING, p), st.binary(max_size=20)),
    st.builds(lambda p: client_frame(OP_PONG, p), st.binary(max_size=20)),
    st.builds(lambda p: client_frame(0x2, p), texts),
    st.builds(lambda p: client_frame(OP_TEXT, p, fin=False), texts),
    st.builds(lambda p: client_frame(0x0, p), texts),
    st.builds(lambda p: client_frame(OP_TEXT, p, masked=False), texts),
    st.builds(lambda p: client_frame(OP_TEXT, p, rsv=4), texts),
    st.builds(lambda p: client_frame(OP_TEXT, p, long_form=True), st.binary(max_size=10)),
    st.builds(lambda c: client_frame(0x8, struct.pack("!H", c)), st.sampled_from([1000, 1001, 4000])),
    st.just(client_frame(0x8, b"")),
    st.binary(min_size=1, max_size=6),
)


def run(stream: bytes, cuts: list[int], fast: bool) -> tuple[list[object], list[object]]:
    original = server_module.at_frame_boundary
    if not fast:
        server_module.at_frame_boundary = lambda ws: False  # type: ignore[assignment]
    try:
        h = Harness(ServerConfig(max_message_size=200), seed=3)
        sender = h.connect("s")
        other = h.connect("o")
        setup = len(h.log)  # handshakes differ (random keys); compare what follows
        positions = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in itertools.pairwise(positions):
            if h.transports[sender.conn_id].state != "open":
                break
            sender.send_raw(stream[a:b])
        other.read()
        return list(h.log[setup:]), [*other.messages, h.server.stats()]
    finally:
        server_module.at_frame_boundary = original


@settings(max_examples=int(os.environ.get("FASTPATH_EXAMPLES", "300")), deadline=None)
@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 10_000), max_size=6))
def test_fast_and_slow_paths_agree(chunks: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(chunks)
    assert run(stream, cuts, fast=True) == run(stream, cuts, fast=False)


def test_fast_path_takes_the_common_frames() -> None:
    text = client_frame(OP_TEXT, "héllo".encode())
    assert next_frame(text, 0, 100) == (OP_TEXT, "héllo".encode(), len(text))
    pong = client_frame(OP_PONG, b"12345678")
    assert next_frame(pong, 0, 100) == (OP_PONG, b"12345678", len(pong))
    both = text + pong
    first = next_frame(both, 0, 100)
    assert first is not None and next_frame(both, first[2], 100) == (OP_PONG, b"12345678", len(both))


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(OP_TEXT, b"\xff"),  # invalid UTF-8: wsproto decides 1007
        client_frame(OP_TEXT, b"x", masked=False),  # unmasked: 1002
        client_frame(OP_TEXT, b"x", rsv=4),  # reserved bit
        client_frame(OP_TEXT, b"x", fin=False),  # a fragment
        client_frame(OP_TEXT, b"x" * 10, long_form=True),  # non-minimal length
        client_frame(0x2, b"x"),  # binary
        client_frame(0x8, b""),  # close
        client_frame(OP_TEXT, b"x" * 101),  # over the limit: wsproto path decides 1009
        client_frame(OP_TEXT, b"hello")[:-1],  # incomplete
    ],
)
def test_fast_path_declines_everything_else(frame: bytes) -> None:
    assert next_frame(frame, 0, 100) is None


def test_fast_path_is_used_for_pongs() -> None:
    calls = []
    original = server_module.next_frame

    def spy(data: bytes, pos: int, limit: int) -> object:
        result = original(data, pos, limit)
        calls.append(result)
        return result

    server_module.next_frame = spy  # type: ignore[assignment]
    try:
        h = Harness()
        peer = h.connect("p")
        h.advance(h.config.heartbeat_interval)
        peer.read()  # answers the Ping
        assert h.server.stats().pongs_received == 1
        assert any(c is not None and c[0] == OP_PONG for c in calls)
    finally:
        server_module.next_frame = original


# ---------------------------------------------------------------- relay runs (message_notifications off)

relay_texts = st.one_of(
    st.sampled_from([b"r1", b"r2-" + b"x" * 60, b"sub:t", b"unsub:t", b'{"type":"heartbeat"}']),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
relay_frames = st.one_of(
    st.builds(lambda p: client_frame(OP_TEXT, p), relay_texts),
    st.builds(lambda p: client_frame(OP_PING, p), st.binary(max_size=8)),
    st.builds(lambda p: client_frame(0x2, p), st.binary(max_size=8)),
    st.builds(lambda p: client_frame(OP_TEXT, p, fin=False), relay_texts),
)


def run_relay(
    chunks: list[bytes], reads: list[int], notify: bool, readers: list[bool]
) -> tuple[object, ...]:
    """A sender's chunks (one read each) relayed to others, some of which read between the
    sender's reads and some never: what each received, how each ended, and the counters."""
    h = Harness(ServerConfig(max_message_size=200, max_outbox_bytes=400), seed=5)
    h.server.message_notifications = notify
    sender = h.connect("s")
    others = [h.connect(f"o{i}") for i in range(len(readers))]
    for other in others:
        other.read()  # the Hello
    for i, chunk in enumerate(chunks):
        if h.transports[sender.conn_id].state != "open":
            break
        sender.send_raw(chunk)
        for other, reads_now in zip(others, readers, strict=True):
            if reads_now and i in reads:
                other.read()
    for other in others:
        other.read()
    kept = [n for n in h.notifications if type(n).__name__ != "MessageReceived"]
    stats = h.server.stats()
    return (
        [(o.messages, h.transports[o.conn_id].state) for o in others],
        sender.read(),
        kept,
        (stats.messages_in, stats.messages_out, stats.slow_consumer_closes, stats.messages_dropped),
    )


@settings(max_examples=int(os.environ.get("FASTPATH_EXAMPLES", "300")), deadline=None)
@given(
    st.lists(st.lists(relay_frames, max_size=10).map(b"".join), max_size=6),
    st.lists(st.integers(0, 5), max_size=4),
    st.lists(st.booleans(), min_size=1, max_size=3),
)
@example([b"".join([client_frame(OP_TEXT, b"r" * 60)] * 10)], [], [False, True])  # one is slow
def test_relay_runs_deliver_what_one_message_at_a_time_does(
    chunks: list[bytes], reads: list[int], readers: list[bool]
) -> None:
    # Off, a run of relay messages in one read goes out as one chunk (server/websocket.py); every
    # recipient must still get the same messages and the same close, the slow ones included.
    assert run_relay(chunks, reads, False, readers) == run_relay(chunks, reads, True, readers)


def test_relay_runs_are_one_chunk_per_recipient() -> None:
    h = Harness()
    h.server.message_notifications = False
    sender = h.connect("s")
    other = h.connect("o")
    other.read()
    before = len(h.output_log)
    sender.send_raw(b"".join(client_frame(OP_TEXT, f"m{i}".encode()) for i in range(5)))
    assert [n for n in h.notifications if type(n).__name__ == "MessageReceived"] == []
    # The observer still sees one record per frame, and the recipient one chunk with all five.
    assert len(h.output_log) - before == 5
    assert h.transports[other.conn_id].data == [b"".join(b"\x81\x02m" + str(i).encode() for i in range(5))]
    other.read()
    assert other.messages[-5:] == [f"m{i}" for i in range(5)]
