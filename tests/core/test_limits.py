"""No peer takes more than its share (issue 10): every limit of ``tank_core.Limits`` on the fake clock.

Each test fails without the limit it is about: a budget that never pauses, a rate never counted, a
cap never checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from wsproto.events import Message

from tank_core import ConfigError, Limits, ServerConfig
from tank_core.actions import PauseReading, ResumeReading
from tank_core.notifications import ClientDisconnected, HttpRequestAnswered
from tank_core.testing import FakeClock, Harness

START = 1024.0


def make(limits: Limits | None = None, **config: Any) -> Harness:
    return Harness(
        ServerConfig(limits=limits if limits is not None else Limits(), **config),
        clock=FakeClock(START),
    )


def closed_with(h: Harness, user: str) -> tuple[int, str]:
    for event in h.notifications:
        if isinstance(event, ClientDisconnected) and event.user_id == user:
            return event.code, event.reason
    raise AssertionError(f"{user} was not closed")


# ---------------------------------------------------------------- the turn budget


def test_input_past_the_budget_waits_for_the_next_turns() -> None:
    h = make(Limits(input_budget=1000, max_frames_per_second=None))
    h.auto_turns = False  # this test is the loop
    sender = h.connect("s")
    frames = b"".join(sender.ws.send(Message(data="x" * 100)) for _ in range(25))  # 2,650 bytes
    actions = sender.send_raw(frames)
    # One budget handled (9 whole frames of 106 bytes, and most of a 10th), then it yields.
    assert PauseReading(conn_id=sender.conn_id) in actions
    assert h.server.stats().messages_in == 9
    assert h.server.turn_wanted
    second = h.server.end_turn(h.now, wall_time=h.clock.wall_time)
    assert ResumeReading(conn_id=sender.conn_id) not in second  # more is left: still paused
    assert h.server.stats().messages_in == 18
    third = h.server.end_turn(h.now, wall_time=h.clock.wall_time)
    assert ResumeReading(conn_id=sender.conn_id) in third  # the rest fit this turn: read again
    assert h.server.stats().messages_in == 25
    assert not h.server.turn_wanted
    assert h.server.stats().limit_hits == {"input_budget": 2}


def test_a_read_that_arrives_while_paused_waits_behind_the_backlog() -> None:
    h = make(Limits(input_budget=500, max_frames_per_second=None))
    h.auto_turns = False
    sender, other = h.connect("s"), h.connect("o")
    frames = [sender.ws.send(Message(data=f"{i:03d}" + "x" * 97)) for i in range(12)]
    sender.send_raw(b"".join(frames[:8]))
    sender.send_raw(b"".join(frames[8:]))  # was on its way when reading paused
    while h.server.turn_wanted:
        h.apply(h.server.end_turn(h.now, wall_time=h.clock.wall_time))
    other.read()
    assert [m[:3] for m in other.messages[1:]] == [f"{i:03d}" for i in range(12)]  # in order


def test_a_small_reader_never_yields() -> None:
    h = make(Limits(input_budget=1000))
    sender = h.connect("s")
    assert PauseReading(conn_id=sender.conn_id) not in sender.send_text("hello")
    assert not h.server.turn_wanted


def test_the_end_of_a_turn_does_not_undo_another_reason_to_pause() -> None:
    h = make(Limits(input_budget=100), authenticate=True)
    h.auto_turns = False
    conn = h.accept()
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"X-Padding: " + b"p" * 200 + b"\r\n\r\n"
    )
    actions = h.feed(conn, request)
    assert PauseReading(conn_id=conn) in actions  # waiting for the verdict (and over budget)
    assert h.server.turn_wanted
    # The turn ends while the application still judges the upgrade: reading stays paused.
    assert h.server.end_turn(h.now, wall_time=h.clock.wall_time) == []


# ---------------------------------------------------------------- rates


def test_a_sender_over_its_byte_rate_is_paused_not_closed_and_resumed_in_time() -> None:
    limits = Limits(max_input_bytes_per_second=10_000, max_frames_per_second=None)
    h = make(limits, max_message_size=2_000, max_outbox_bytes=100_000)
    sender = h.connect("s")
    other = h.connect("o")
    burst = b"".join(sender.ws.send(Message(data="y" * 1_000)) for _ in range(6))  # ~6 KB > 4 KB
    actions = sender.send_raw(burst)
    assert PauseReading(conn_id=sender.conn_id) in actions
    other.read()
    assert len([m for m in other.messages if m == "y" * 1_000]) == 6  # nothing lost
    deadline = h.server.next_deadline()
    assert deadline is not None and deadline <= h.now + 1.0  # back under the rate within ~0.2 s
    h.clock.advance(deadline - h.now)
    assert ResumeReading(conn_id=sender.conn_id) in h.tick()
    assert h.transports[sender.conn_id].state == "open"
    assert h.server.stats().limit_hits == {"input_rate": 1}


def test_a_frame_flood_is_closed_1008_and_the_others_go_on() -> None:
    h = make(Limits(max_frames_per_second=100))
    flooder = h.connect("f")
    calm = h.connect("c")
    flooder.send_raw(b"".join(flooder.ws.send(Message(data="sub:x")) for _ in range(300)))
    assert closed_with(h, "f") == (1008, "rate limit exceeded")
    calm.send_text("sub:y")
    assert h.server.stats().topics == {"y": 1}
    assert h.server.stats().limit_hits == {"max_frames_per_second": 1}


def test_a_steady_sender_under_the_frame_rate_is_never_closed() -> None:
    h = make(Limits(max_frames_per_second=100))
    peer = h.connect("p")
    for _ in range(50):
        h.clock.advance(0.02)  # 50 frames per second, for a second
        peer.send_text("sub:x")
    assert not [e for e in h.notifications if isinstance(e, ClientDisconnected)]


# ---------------------------------------------------------------- counts and sizes


def test_unfinished_messages_past_the_process_cap_close_with_1013() -> None:
    h = make(Limits(max_partial_bytes=3_000), max_message_size=10_000, max_outbox_bytes=40_000)
    first, second = h.connect("a"), h.connect("b")
    first.send_raw(first.ws.send(Message(data="a" * 2_000, message_finished=False)))
    assert h.server.stats().partial_bytes == 2_000
    second.send_raw(second.ws.send(Message(data="b" * 2_000, message_finished=False)))
    assert closed_with(h, "b") == (1013, "server busy: try again later")
    assert h.server.stats().partial_bytes == 2_000  # b's share is released
    first.send_raw(first.ws.send(Message(data="a", message_finished=True)))
    assert h.server.stats().partial_bytes == 0
    first.vanish()
    assert h.server.stats().limit_hits == {"max_partial_bytes": 1}


def test_a_connection_that_leaves_mid_message_releases_its_share() -> None:
    h = make(Limits(max_partial_bytes=3_000), max_message_size=10_000, max_outbox_bytes=40_000)
    peer = h.connect("a")
    peer.send_raw(peer.ws.send(Message(data="a" * 2_000, message_finished=False)))
    peer.vanish()
    assert h.server.stats().partial_bytes == 0


def test_sockets_past_max_connections_are_answered_503() -> None:
    h = make(Limits(max_connections=2))
    h.connect("a")
    h.connect("b")
    conn = h.accept()
    answer = h.flush(conn)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert h.close_asked(conn)
    assert h.server.stats().limit_hits == {"max_connections": 1}


def test_upgrades_past_the_per_address_limit_are_503_and_other_addresses_go_on() -> None:
    h = make(Limits(max_connections_per_address=2))
    h.connect("a", peer_host="10.0.0.1")
    h.connect("b", peer_host="10.0.0.1")
    refused = h.connect("c", peer_host="10.0.0.1")
    assert not refused.accepted and refused.rejected is not None
    assert refused.rejected.status_code == 503
    h.connect("d", peer_host="10.0.0.2")
    assert h.server.stats().connections == 3
    assert h.server.stats().limit_hits == {"max_connections_per_address": 1}


def test_the_per_address_count_follows_connections_that_end() -> None:
    h = make(Limits(max_connections_per_address=1))
    first = h.connect("a", peer_host="10.0.0.1")
    first.vanish()
    h.connect("b", peer_host="10.0.0.1")  # the first one's place is free again


def test_topics_per_connection_and_topic_length_close_1008() -> None:
    h = make(Limits(max_topics_per_connection=3, max_topic_length=10))
    many = h.connect("many")
    for topic in ("a", "b", "c", "a"):  # a repeated sub: stays idempotent at the limit
        many.send_text("sub:" + topic)
    many.send_text("sub:d")
    assert closed_with(h, "many") == (1008, "too many topics")
    long = h.connect("long")
    long.send_text("sub:" + "t" * 11)
    assert closed_with(h, "long") == (1008, "topic name too long")
    assert h.server.stats().limit_hits == {"max_topics_per_connection": 1, "max_topic_length": 1}
    answer = h.http("POST", "/api/publish", body=json.dumps({"topic": "t" * 11, "data": "d"}).encode())
    assert answer.status == 400 and b"longer than 10 bytes" in answer.body


def test_stats_and_metrics_list_the_largest_topics_only() -> None:
    h = make(Limits(max_stats_entries=2))
    for i, topics in enumerate((["big", "mid", "small"], ["big", "mid"], ["big"])):
        peer = h.connect(f"p{i}")
        for topic in topics:
            peer.send_text("sub:" + topic)
    stats = json.loads(h.http("GET", "/api/stats").body)
    assert stats["topics"] == {"big": 3, "mid": 2} and stats["topics_total"] == 3
    metrics = h.http("GET", "/metrics").body.decode()
    assert 'topic="big"' in metrics and 'topic="small"' not in metrics
    assert 'tank_limit_hits_total{limit="max_partial_bytes"} 0' in metrics


# ---------------------------------------------------------------- configuration


def test_an_outbox_smaller_than_one_message_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_outbox_bytes"):
        ServerConfig(max_message_size=1_048_576, max_outbox_bytes=1_000_000)


@pytest.mark.parametrize(
    "field,value",
    [("input_budget", 0), ("max_frames_per_second", -1), ("max_connections", 0),
     ("max_input_bytes_per_second", float("inf")), ("max_topic_length", True)],
)
def test_bad_limits_are_config_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        Limits(**{field: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------- smaller defects (issue 10)


def test_a_peer_close_1014_is_echoed_not_answered_1002() -> None:
    h = make()
    peer = h.connect("p")
    masked_code = bytes(a ^ b for a, b in zip((1014).to_bytes(2, "big"), b"ab", strict=True))
    peer.send_raw(b"\x88\x82abcd" + masked_code)
    assert closed_with(h, "p") == (1014, "")
    assert h.flush(peer.conn_id).endswith(b"\x88\x02\x03\xf6")  # our echo: Close 1014, unmasked


@pytest.mark.parametrize("where", ["split byte by byte", "inside a fragmented message"])
def test_a_peer_close_1014_is_echoed_however_it_arrives(where: str) -> None:
    h = make()
    peer = h.connect("p")
    masked = bytes(a ^ b for a, b in zip((1014).to_bytes(2, "big") + b"gw", b"abcd", strict=True))
    close = b"\x88\x84abcd" + masked
    if where == "split byte by byte":
        for i in range(len(close)):
            peer.send_raw(close[i : i + 1])
    else:
        fragment = bytes(b ^ k for b, k in zip(b"half", b"abcd", strict=True))
        peer.send_raw(b"\x01\x84abcd" + fragment + close)
    assert closed_with(h, "p") == (1014, "gw")
    assert h.flush(peer.conn_id).endswith(b"\x88\x02\x03\xf6")


def test_a_request_head_over_16_kib_in_one_read_is_431() -> None:
    h = make()
    conn = h.accept()
    h.feed(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 17_000 + b"\r\n\r\n")
    assert h.flush(conn).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_status_lines_carry_their_reason_phrase() -> None:
    h = make()
    conn = h.accept()
    h.feed(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.flush(conn).startswith(b"HTTP/1.1 200 OK\r\n")


def test_readyz_says_ready_until_shutdown_and_healthz_stays_alive() -> None:
    h = make()
    ready = h.http("GET", "/readyz")
    assert (ready.status, ready.body) == (200, b"ready")
    h.apply(h.server.shutdown(now=h.now, wall_time=h.clock.wall_time))
    assert h.http("GET", "/readyz").status == 503
    assert h.http("GET", "/healthz").status == 200


def test_every_answered_request_is_reported_for_the_access_log() -> None:
    h = make()
    h.http("GET", "/healthz")
    h.http("GET", "/nowhere")
    answered = [(n.method, n.target, n.status) for n in h.notifications
                if isinstance(n, HttpRequestAnswered)]
    assert answered == [("GET", "/healthz", 200), ("GET", "/nowhere", 404)]


def test_a_turn_handles_at_most_budget_over_64_frames_however_small() -> None:
    h = make(Limits(input_budget=64 * 100, max_frames_per_second=None))
    h.auto_turns = False
    peer = h.connect("p")
    frame = peer.ws.send(Message(data="unsub:x"))  # 13 bytes: 250 of them are far below 6,400
    actions = peer.send_raw(frame * 250)
    assert PauseReading(conn_id=peer.conn_id) in actions
    assert h.server.stats().messages_in == 100
    h.apply(h.server.end_turn(h.now, wall_time=h.clock.wall_time))
    assert h.server.stats().messages_in == 200
    last = h.server.end_turn(h.now, wall_time=h.clock.wall_time)
    assert h.server.stats().messages_in == 250
    assert ResumeReading(conn_id=peer.conn_id) in last


def test_a_flood_on_the_slow_path_is_closed_at_the_frame_past_the_rate() -> None:
    # Binary frames go through wsproto, not the fast path: the rate is checked there as they come.
    h = make(Limits(max_frames_per_second=100))
    peer = h.connect("p")
    peer.send_raw(peer.ws.send(Message(data=b"\xff")) * 5_000)
    assert closed_with(h, "p") == (1008, "rate limit exceeded")
    assert h.server.stats().messages_in + h.server.stats().messages_dropped <= 201


# ---------------------------------------------------------------- found in review


def test_input_held_past_the_budget_is_handled_when_the_socket_closes() -> None:
    # asyncio's TLS transport hands a whole burst over, then its EOF, paused or not.
    h = make(Limits(input_budget=1000, max_frames_per_second=None))
    h.auto_turns = False
    sender, other = h.connect("s"), h.connect("o")
    sender.send_raw(b"".join(sender.ws.send(Message(data=f"m{i:02d}" + "x" * 97)) for i in range(30)))
    assert h.server.turn_wanted
    sender.vanish()
    other.read()
    assert [m[:3] for m in other.messages[1:]] == [f"m{i:02d}" for i in range(30)]


def test_the_per_address_limit_holds_when_the_application_authenticates() -> None:
    # Both ask while neither is counted yet; the second verdict must not open a second one.
    h = make(Limits(max_connections_per_address=1), authenticate=True)
    first = h.connect("a", peer_host="10.0.0.1")
    second = h.connect("b", peer_host="10.0.0.1")
    assert not first.accepted and not second.accepted  # both wait for the application
    h.answer_authorization(first.conn_id, True)
    h.answer_authorization(second.conn_id, True)
    first.read()
    second.read()
    assert first.accepted
    assert not second.accepted and second.rejected is not None
    assert second.rejected.status_code == 503
    assert h.server.stats().connections == 1


def test_small_frames_are_charged_once_against_the_byte_rate() -> None:
    h = make(Limits(input_budget=6_400, max_frames_per_second=None), max_message_size=100_000,
             max_outbox_bytes=400_000)
    peer = h.connect("p")
    frame = peer.ws.send(Message(data="unsub:"))  # 12 bytes; 100 frames per turn
    wire = h.server._wires[peer.conn_id]
    full = wire.byte_tokens
    peer.send_raw(frame * 2_000)  # 24,000 bytes, in 20 turns
    assert h.server.stats().messages_in == 2_000
    assert wire.byte_tokens == full - 24_000
    assert 1 <= h.server.stats().limit_hits["input_budget"] <= 20  # once per turn at most


def test_on_the_slow_path_the_frame_over_the_rate_is_not_handled() -> None:
    h = make(Limits(max_frames_per_second=10))  # bursts of 20
    peer = h.connect("p")
    peer.send_raw(peer.ws.send(Message(data=b"sub:t")) * 21)  # binary: wsproto's path
    assert closed_with(h, "p") == (1008, "rate limit exceeded")
    assert h.server.stats().messages_in == 20
