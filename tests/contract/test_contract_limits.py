"""The contract, part 7: no peer takes more than its share (issue 10). The core decides; each
transport must carry out its pauses and give it its turns, or these tests hang and fail."""

from __future__ import annotations

import contextlib
import threading
import time

from contract_support import OP_CLOSE, OP_TEXT, RawPeer, Serve, eventually, masked_frame

from tank_core import Limits, ServerConfig

MESSAGE = "m" * 100


def test_a_sender_over_its_turn_budget_yields_and_loses_nothing(serve: Serve) -> None:
    # 4,000 relayed messages in 0.4 MB: with a 4 KiB budget the sender yields after every read
    # (reads are larger); each yield is a pause that only the transport's next turn (end_turn)
    # lifts, so a transport that never calls end_turn leaves the sender paused for good.
    limits = Limits(input_budget=4096, max_frames_per_second=None, max_input_bytes_per_second=None)
    srv = serve(ServerConfig(limits=limits, heartbeat_interval=30, heartbeat_timeout=60))
    receiver = RawPeer.open(srv.port, "/ws?user_id=r")
    sender = RawPeer.open(srv.port, "/ws?user_id=s")
    receiver.next_frame()  # Hello
    frames = masked_frame(OP_TEXT, MESSAGE.encode()) * 4000
    writer = threading.Thread(target=sender.send, args=(frames,))
    writer.start()
    got = 0
    while got < 4000:
        opcode, payload = receiver.next_frame()
        if opcode == OP_TEXT and payload == MESSAGE.encode():
            got += 1
    writer.join()
    stats = srv.stats()
    assert stats.messages_in == 4000
    assert stats.limit_hits.get("input_budget", 0) >= 2
    sender.close()
    receiver.close()


def test_a_sender_over_its_byte_rate_is_slowed_not_closed(serve: Serve) -> None:
    limits = Limits(max_input_bytes_per_second=200_000, max_frames_per_second=None)
    config = ServerConfig(limits=limits, max_message_size=50_000, max_outbox_bytes=400_000,
                          heartbeat_interval=30, heartbeat_timeout=60)
    srv = serve(config)
    receiver = RawPeer.open(srv.port, "/ws?user_id=r")
    sender = RawPeer.open(srv.port, "/ws?user_id=s")
    receiver.next_frame()
    big = "b" * 40_000
    sender.send(masked_frame(OP_TEXT, big.encode()) * 10)  # 400 KB: twice the burst and more
    for _ in range(10):
        opcode, payload = receiver.next_frame(timeout=10)
        while opcode != OP_TEXT or payload == b"heartbeat":
            opcode, payload = receiver.next_frame(timeout=10)
        assert payload == big.encode()
    assert srv.stats().limit_hits.get("input_rate", 0) >= 1
    assert srv.stats().connections == 2
    sender.close()
    receiver.close()


def test_a_frame_flood_is_closed_1008(serve: Serve) -> None:
    srv = serve(ServerConfig(limits=Limits(max_frames_per_second=200)))
    flooder = RawPeer.open(srv.port, "/ws?user_id=f")
    flooder.next_frame()  # Hello
    with contextlib.suppress(OSError):  # closed while we were still writing
        flooder.send(masked_frame(OP_TEXT, b"sub:x") * 2000)
    frames = flooder.frames_until_eof()
    closes = [payload for opcode, payload in frames if opcode == OP_CLOSE]
    assert closes and closes[0][:2] == (1008).to_bytes(2, "big")
    assert b"rate limit exceeded" in closes[0]
    eventually(lambda: srv.stats().limit_hits.get("max_frames_per_second") == 1)


def test_a_failed_connection_gets_its_close_frame_not_a_reset(serve: Serve) -> None:
    # The peer's bad frame comes with more input that the server will never read: closing right
    # away would answer with a TCP reset that destroys the Close 1007 on its way (issue 10).
    srv = serve(ServerConfig(limits=Limits(max_frames_per_second=None)))
    for _ in range(3):
        peer = RawPeer.open(srv.port, "/ws?user_id=p")
        peer.next_frame()  # Hello
        peer.send(masked_frame(OP_TEXT, b"\xff") + masked_frame(OP_TEXT, b"x" * 100) * 2000)
        time.sleep(0.2)  # everything is in the server's buffers before we read anything
        frames = []
        while True:
            try:
                frames.append(peer.next_frame())
            except EOFError:
                break  # the server's FIN, after its Close: no reset
            if frames[-1][0] == OP_CLOSE:
                peer.send_close(1007)
        closes = [payload for opcode, payload in frames if opcode == OP_CLOSE]
        assert closes and closes[0][:2] == (1007).to_bytes(2, "big")
        peer.close()


def test_a_relay_flood_of_large_messages_closes_none_of_the_others(serve: Serve) -> None:
    # One client sends 1 MiB texts, relayed to everyone; without a byte rate it outruns what the
    # server can write, and every subscriber is closed 1008 "slow consumer" (issue 10).
    srv = serve(ServerConfig(heartbeat_interval=30, heartbeat_timeout=60))
    subscribers = [RawPeer.open(srv.port, f"/ws?user_id=s{i}") for i in range(10)]
    counts = [0] * len(subscribers)
    big = b"B" * 1_048_000

    def read(index: int) -> None:
        peer = subscribers[index]
        with contextlib.suppress(OSError, EOFError):
            while True:
                opcode, payload = peer.next_frame(timeout=10)
                if opcode == OP_CLOSE:
                    return
                if payload == big:
                    counts[index] += 1

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(subscribers))]
    for reader in readers:
        reader.start()
    flooder = RawPeer.open(srv.port, "/ws?user_id=flood")
    frame = masked_frame(OP_TEXT, big)
    deadline = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < deadline:
        flooder.send(frame)
        sent += 1
    eventually(lambda: min(counts) >= 4, timeout=20)  # everyone keeps receiving
    stats = srv.stats()
    assert stats.slow_consumer_closes == 0
    assert stats.connections == len(subscribers) + 1
    assert stats.limit_hits.get("input_rate", 0) >= 1  # the flooder was slowed, not the others
    flooder.close()
    for peer in subscribers:
        peer.close()
    for reader in readers:
        reader.join()
