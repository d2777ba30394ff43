"""Misbehaving peers made of raw sockets and hand-made frames, on both backends, over ws:// and
wss:// (over TLS the same hand-made bytes travel inside TLS records).

A peer that never answers, one that stops reading, one that sends garbage or half a frame, one that
vanishes without a Close: each is dealt with as PROTOCOL.md says, and never disturbs the others.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from e2e_support import (
    CLOSE_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    StartServer,
    TankProcess,
    close_payload,
    connect_hello,
    expect_next,
    frame,
    recv_data,
    run,
    wait_closed_code,
)
from websockets.asyncio.client import ClientConnection

# How late after heartbeat_timeout a silent peer may be closed (PROTOCOL.md: "no later than one
# scheduling delay"; issue 3: between heartbeat_timeout and heartbeat_timeout + 0.5 s).
LATE_BOUND = 0.5


async def _observer_round_trip(a: ClientConnection, b: ClientConnection, text: str) -> None:
    await a.send(text)
    await expect_next(b, text)


def test_peer_that_never_answers_pings_is_closed_1011_in_time(server: TankProcess) -> None:
    async def main() -> None:
        healthy = await connect_hello(server.url("healthy"), "healthy")
        peer = await RawClient.connect(server, user_id="silent")
        await peer.send_text("sub:quiet")  # its last sign of life
        last_sign = peer.last_sent
        close, before = await peer.read_until_close(timeout=HEARTBEAT_TIMEOUT + 3)
        silent_for = close.at - last_sign
        assert close.close_code == 1011, close
        assert close.close_reason == "heartbeat timeout"
        assert HEARTBEAT_TIMEOUT <= silent_for <= HEARTBEAT_TIMEOUT + LATE_BOUND, silent_for
        assert any(f.opcode == OP_PING for f in before), "the server never pinged"
        assert any(f.opcode == OP_TEXT and f.payload == b"heartbeat" for f in before)
        await peer.send_frame(OP_CLOSE, close_payload(1011))
        assert await peer.at_eof(2)
        snapshot = await server.astats()
        assert snapshot["heartbeat_timeouts"] == 1
        assert snapshot["connections"] == 1 and snapshot["topics"] == {}
        # The healthy client, which answered every ping, is untouched.
        await healthy.send("sub:ok")
        await server.await_stats(lambda s: s["topics"] == {"ok": 1})
        await healthy.close()

    run(main())


def test_half_a_frame_then_stall_is_closed_1011(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        peer = await RawClient.connect(server, user_id="half")
        whole = frame(OP_TEXT, b"x" * 100)
        await peer.send_raw(whole[:20])  # header, mask and 14 payload bytes of 100
        last_sign = peer.last_sent
        # Meanwhile everyone else is served normally.
        for i in range(5):
            await _observer_round_trip(a, b, f"during {i}")
            await asyncio.sleep(0.05)
        close, _ = await peer.read_until_close(timeout=HEARTBEAT_TIMEOUT + 3)
        assert close.close_code == 1011
        assert HEARTBEAT_TIMEOUT <= close.at - last_sign <= HEARTBEAT_TIMEOUT + LATE_BOUND
        assert await peer.at_eof(2)
        await server.await_stats(lambda s: s["connections"] == 2)
        await server.abroadcast("sentinel")
        await expect_next(a, "sentinel")  # the half message was never relayed
        await expect_next(b, "sentinel")

    run(main())


BAD_FRAMES = {
    "unmasked": (frame(OP_TEXT, b"hello", mask=False), 1002),
    "reserved-opcode": (frame(0x3, b"x"), 1002),
    "reserved-control-opcode": (frame(0xB, b"x"), 1002),
    "rsv1-without-extension": (frame(OP_TEXT, b"x", rsv=4), 1002),
    "continuation-first": (frame(OP_CONT, b"x"), 1002),
    "fragmented-ping": (frame(OP_PING, b"x", fin=False), 1002),
    "oversized-ping": (frame(OP_PING, b"x" * 126), 1002),
    "close-code-999": (frame(OP_CLOSE, close_payload(999)), 1002),
    "one-byte-close": (frame(OP_CLOSE, b"\x03"), 1002),
    "text-during-fragmented-text": (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    "garbage": (bytes(range(255, 127, -1)) * 4, 1002),
    "invalid-utf8-text": (frame(OP_TEXT, b"caf\xc3"), 1007),
    "invalid-utf8-fragments": (frame(OP_TEXT, b"ok", fin=False) + frame(OP_CONT, b"\xed\xa0\x80"), 1007),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frames_close_with_the_right_code(server: TankProcess, case: str) -> None:
    data, code = BAD_FRAMES[case]

    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        peer = await RawClient.connect(server, user_id="bad")
        await peer.send_raw(data)
        close, _ = await peer.read_until_close(timeout=3)
        assert close.close_code == code, (case, close)
        assert await peer.at_eof(3), "the server kept TCP open after the failed connection"
        await server.await_stats(lambda s: s["connections"] == 2)
        await _observer_round_trip(a, b, "still fine")
        await server.abroadcast("sentinel")
        await expect_next(b, "sentinel")  # nothing of the bad peer's bytes was relayed

    run(main())


def test_garbage_instead_of_http_gets_400(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        peer = await RawClient.open(server)
        await peer.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
        head = await asyncio.wait_for(peer.reader.read(4096), 3)
        assert head.startswith(b"HTTP/1.1 400"), head
        assert await peer.at_eof(3)
        assert (await server.astats())["connections"] == 1
        await a.send("sub:fine")
        await server.await_stats(lambda s: s["topics"] == {"fine": 1})

    run(main())


def test_reader_that_stops_is_closed_1008_while_others_receive(start_server: StartServer) -> None:
    # A long close timeout leaves the stalled peer time to drain and see the Close frame.
    server = start_server("--max-outbox-bytes", "262144", "--max-message-size", "65536",
                          close_timeout=3.0)
    payload = "p" * 65536

    async def main() -> None:
        good = await connect_hello(server.url("good"), "good")
        await good.send("sub:big")
        stalled = await RawClient.connect(server, user_id="stalled", rcvbuf=4096)
        await stalled.send_text("sub:big")
        await server.await_stats(lambda s: s["topics"] == {"big": 2})

        async def proof_of_life() -> None:  # alive and talking, just not reading
            while True:
                await stalled.send_text('{"type":"heartbeat"}')
                await asyncio.sleep(0.1)

        stalled.stop_reading()
        talker = asyncio.create_task(proof_of_life())
        published = 0
        try:
            for _ in range(400):
                await server.apublish("big", f"{published:06d}{payload}")
                published += 1
                got = json.loads(await _data(good))
                assert got == {"topic": "big", "data": f"{published - 1:06d}{payload}"}
                if (await server.astats())["slow_consumer_closes"]:
                    break
        finally:
            talker.cancel()
        snapshot = await server.astats()
        assert snapshot["slow_consumer_closes"] == 1, snapshot
        assert snapshot["heartbeat_timeouts"] == 0
        assert snapshot["topics"] == {"big": 1}
        # The others keep receiving after the closure.
        for _ in range(5):
            await server.apublish("big", f"{published:06d}{payload}")
            published += 1
            got = json.loads(await _data(good))
            assert got["data"].startswith(f"{published - 1:06d}")
        # The stalled peer, once it reads again, finds whole messages in order, then Close 1008.
        stalled.resume_reading()
        close, before = await stalled.read_until_close(timeout=5)
        assert close.close_code == 1008 and close.close_reason == "slow consumer", close
        received = [json.loads(f.payload)["data"][:6] for f in before
                    if f.opcode == OP_TEXT and f.payload.startswith(b"{")]
        assert received == [f"{i:06d}" for i in range(len(received))]
        assert 0 < len(received) < published

    run(main(), timeout=60)


async def _data(ws: ClientConnection) -> str:
    got = await recv_data(ws, 5)
    assert isinstance(got, str)
    return got


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_peer_that_vanishes_without_close_is_forgotten(server: TankProcess, how: str) -> None:
    async def main() -> None:
        observer = await connect_hello(server.url("obs"), "obs")
        peer = await RawClient.connect(server, user_id="ghost")
        await peer.send_text("sub:ghost-topic")
        await server.await_stats(
            lambda s: s["connections"] == 2 and s["topics"] == {"ghost-topic": 1}
        )
        started = time.monotonic()
        if how == "fin":
            await peer.close()  # TCP FIN (over TLS: close_notify, then FIN), no Close frame
        else:
            peer.abort()  # TCP RST
        await server.await_stats(
            lambda s: s["connections"] == 1 and s["topics"] == {}, timeout=2, what="ghost gone"
        )
        assert time.monotonic() - started < 2
        assert await server.apublish("ghost-topic", "x") == 0
        assert await server.adisconnect("ghost") == 0
        await observer.send("sub:alive")
        await server.await_stats(lambda s: s["topics"] == {"alive": 1})

    run(main())


def test_raw_ping_pong_fragments_and_pipelining(server: TankProcess) -> None:
    async def main() -> None:
        other = await connect_hello(server.url("other"), "other")
        # The upgrade request and the first frames in one write: nothing after the head is lost.
        peer = await RawClient.open(server)
        request = (
            b"GET /ws?user_id=raw HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await peer.send_raw(request + frame(OP_TEXT, b"sub:pipe"))
        head = await asyncio.wait_for(peer.reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (await peer.read_frame()).payload == b"Hello, raw! Welcome to WebSocket server."
        await server.await_stats(lambda s: s["topics"] == {"pipe": 1})

        # A client Ping is answered with a Pong carrying the same payload.
        await peer.send_frame(OP_PING, b"abc\x00\xff")
        while True:
            got = await peer.read_frame()
            if got.opcode == OP_PONG:
                assert got.payload == b"abc\x00\xff"
                break

        # A fragmented message with a Ping in the middle: relayed whole, Ping answered at once.
        await peer.send_frame(OP_TEXT, b"frag", fin=False)
        await peer.send_frame(OP_PING, b"mid")
        while True:
            got = await peer.read_frame()
            if got.opcode == OP_PONG:
                assert got.payload == b"mid"
                break
        await peer.send_frame(OP_CONT, b"-men", fin=False)
        await peer.send_frame(OP_CONT, b"ted")
        await expect_next(other, "frag-mented")
        # Fragmented sub: works too; binary fragments are relayed as text.
        await peer.send_frame(OP_TEXT, b"sub:", fin=False)
        await peer.send_frame(OP_CONT, b"two")
        await peer.send_frame(OP_BINARY, "bin ✓".encode(), fin=False)
        await peer.send_frame(OP_CONT, b"ary")
        await expect_next(other, "bin ✓ary")
        await server.await_stats(lambda s: s["topics"] == {"pipe": 1, "two": 1})
        assert await server.apublish("two", "2") == 1
        got = await peer.read_data()
        assert got.opcode == OP_TEXT and got.payload == b'{"topic":"two","data":"2"}'

        await peer.send_frame(OP_CLOSE, close_payload(1000))
        close, _ = await peer.read_until_close()
        assert close.close_code == 1000
        assert await peer.at_eof(2)
        await server.await_stats(lambda s: s["connections"] == 1 and s["topics"] == {})

    run(main())


def test_close_without_status_is_echoed_without_status(server: TankProcess) -> None:
    # PROTOCOL.md: "the server answers with a close frame carrying the same code"; DESIGN.md:
    # "echo a Close with the peer's code (an empty body if none came, never 1000)". The JS client's
    # close() sends exactly this Close with no status code.
    async def main() -> None:
        peer = await RawClient.connect(server, user_id="nostatus")
        await peer.send_frame(OP_CLOSE)
        close, _ = await peer.read_until_close()
        assert close.payload == b"", f"answered an empty Close with code {close.close_code}"
        assert await peer.at_eof(2)
        await server.await_stats(lambda s: s["connections"] == 0)

    run(main())


def test_json_heartbeat_is_proof_of_life(server: TankProcess) -> None:
    # A peer that never answers Pings but sends {"type":"heartbeat"} stays open; once it stops,
    # it is closed 1011 a heartbeat timeout after its last message.
    async def main() -> None:
        peer = await RawClient.connect(server, user_id="talker")
        end = time.monotonic() + 2.5 * HEARTBEAT_TIMEOUT
        while time.monotonic() < end:
            await peer.send_text('{"type":"heartbeat"}')
            await asyncio.sleep(HEARTBEAT_TIMEOUT / 4)
        last_sign = peer.last_sent
        snapshot = await server.astats()
        assert snapshot["connections"] == 1 and snapshot["heartbeat_timeouts"] == 0
        close, before = await peer.read_until_close(timeout=HEARTBEAT_TIMEOUT + 3)
        assert any(f.opcode == OP_PING for f in before)
        assert close.close_code == 1011
        assert HEARTBEAT_TIMEOUT <= close.at - last_sign <= HEARTBEAT_TIMEOUT + LATE_BOUND

    run(main())


def test_close_timeout_when_the_peer_never_answers_our_close(server: TankProcess) -> None:
    async def main() -> None:
        quiet = await RawClient.connect(server, user_id="quiet")
        polite = await RawClient.connect(server, user_id="polite")
        assert await server.adisconnect("quiet") == 1
        close, _ = await quiet.read_until_close(answer_pings=False)
        assert close.close_code == 1000
        assert await quiet.at_eof(CLOSE_TIMEOUT + 1)
        waited = time.monotonic() - close.at
        # Dropped close_timeout after the Close (not before, not much later).
        assert CLOSE_TIMEOUT - 0.1 <= waited <= CLOSE_TIMEOUT + LATE_BOUND, waited
        # A peer that answers the Close sees TCP end promptly.
        assert await server.adisconnect("polite") == 1
        close, _ = await polite.read_until_close()
        assert close.close_code == 1000
        await polite.send_frame(OP_CLOSE, close_payload(1000))
        assert await polite.at_eof(CLOSE_TIMEOUT / 2)
        await server.await_stats(lambda s: s["connections"] == 0)

    run(main())


def test_shutdown_is_bounded_with_a_peer_that_neither_reads_nor_answers(
    start_server: StartServer,
) -> None:
    server = start_server("--max-outbox-bytes", "16777216")

    async def main() -> None:
        good = await connect_hello(server.url("good"), "good")
        stuck = await RawClient.connect(server, user_id="stuck", rcvbuf=4096)
        await stuck.send_text("sub:flood")
        await server.await_stats(lambda s: s["topics"] == {"flood": 1})
        stuck.stop_reading()
        # It keeps proving it is alive (so no heartbeat timeout), but never reads again.
        for _ in range(400):
            await stuck.send_text('{"type":"heartbeat"}')
            await server.apublish("flood", "f" * 65536)
            if (await server.astats())["outbox_bytes"] > 1_000_000:
                break
        snapshot = await server.astats()
        assert snapshot["outbox_bytes"] > 1_000_000 and snapshot["connections"] == 2, snapshot
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert await recv_data(good) == "Server is shutting down"
        assert (await wait_closed_code(good))[0] == 1001
        rc = await asyncio.to_thread(server.wait, CLOSE_TIMEOUT + 5)
        took = time.monotonic() - stopping
        assert rc == 0
        assert took <= CLOSE_TIMEOUT + 1.5, took  # close_timeout, then stragglers are aborted

    run(main())


def test_pipelined_http_requests_then_upgrade_on_one_connection(server: TankProcess) -> None:
    async def main() -> None:
        peer = await RawClient.open(server)
        health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        upgrade = (
            b"GET /ws?user_id=kept HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await peer.send_raw(health + health + upgrade + frame(OP_TEXT, b"sub:kept"))
        for _ in range(2):
            head = await asyncio.wait_for(peer.reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(peer.reader.readexactly(2), 3) == b"ok"
        head = await asyncio.wait_for(peer.reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (await peer.read_frame()).payload == b"Hello, kept! Welcome to WebSocket server."
        await server.await_stats(lambda s: s["topics"] == {"kept": 1})
        assert await server.apublish("kept", "k") == 1
        assert (await peer.read_data()).payload == b'{"topic":"kept","data":"k"}'

    run(main())
