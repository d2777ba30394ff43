"""The contract, part 5: time and backpressure. A peer that stops answering is closed 1011 in
time, one that stops reading 1008 ``slow consumer``, and the others never notice."""

from __future__ import annotations

import json
import time

from contract_support import FAST, OP_PING, RawPeer, Serve, eventually, masked_frame, recv_text, ws_client

from tank_core import ServerConfig
from tank_core.notifications import (
    ErrorOccurred,
    HeartbeatTimedOut,
    Notification,
    SlowConsumerClosed,
)


def test_a_silent_peer_is_closed_1011_in_time_and_the_others_stay(serve: Serve) -> None:
    events: list[Notification] = []
    srv = serve(FAST, on_event=events.append)
    good = ws_client(srv.url + "?user_id=good")  # answers Pings on its own
    recv_text(good)
    sent_at = time.monotonic()
    silent = RawPeer.open(srv.port, "/ws?user_id=silent")  # reads, never answers a Ping
    accepted_at = time.monotonic()
    _texts, code, reason = silent.until_close()
    closed_at = time.monotonic()
    assert (code, reason) == (1011, "heartbeat timeout")
    assert silent.pings >= 2
    assert closed_at - sent_at >= FAST.heartbeat_timeout - 0.05
    assert closed_at - accepted_at <= FAST.heartbeat_timeout + 0.5
    assert silent.at_eof()
    silent.close()
    pongs = srv.stats().pongs_received
    time.sleep(2 * FAST.heartbeat_interval)  # the good one is still pinged, and answers
    stats = srv.stats()
    assert stats.connections == 1 and stats.heartbeat_timeouts == 1
    assert stats.pongs_received > pongs
    good.send("sub:x")
    eventually(lambda: srv.stats().topics.get("x") == 1)
    assert srv.call(lambda s: s.publish("x", "still here")) == 1
    assert json.loads(recv_text(good)) == {"topic": "x", "data": "still here"}
    good.close()
    timeouts = [e for e in events if isinstance(e, HeartbeatTimedOut)]
    assert [e.user_id for e in timeouts] == ["silent"]
    errors = [e for e in events if isinstance(e, ErrorOccurred)]
    assert any(e.code == 1005 and e.user_id == "silent" for e in errors)


def test_a_new_connection_on_an_idle_server_is_pinged_on_time(serve: Serve) -> None:
    """The timer, asleep until far away (request_timeout), is moved sooner for a new connection."""
    config = ServerConfig(heartbeat_interval=0.3, heartbeat_timeout=10, close_timeout=0.3,
                          request_timeout=60)
    srv = serve(config)
    time.sleep(0.1)
    peer = RawPeer.open(srv.port)
    started = time.monotonic()
    while peer.next_frame()[0] != OP_PING:
        pass
    assert time.monotonic() - started < config.heartbeat_interval + 0.2
    peer.close()


def test_a_reader_that_stops_is_closed_1008_while_the_others_get_everything(serve: Serve) -> None:
    config = ServerConfig(heartbeat_interval=30, heartbeat_timeout=60, close_timeout=2.0,
                          max_outbox_bytes=256 * 1024, max_message_size=64 * 1024)
    slow: list[SlowConsumerClosed] = []
    srv = serve(config, on_event=lambda e: slow.append(e) if isinstance(e, SlowConsumerClosed) else None)
    stalled = RawPeer.open(srv.port, "/ws?user_id=stalled", rcvbuf=4096,
                           after=masked_frame(0x1, b"sub:feed"))
    good = ws_client(srv.url + "?user_id=good", max_size=None)
    recv_text(good)
    good.send("sub:feed")
    eventually(lambda: srv.stats().topics.get("feed") == 2)
    payload = "x" * 32768
    published = 0
    while not slow:  # in step with the reader that keeps up
        assert published < 500, "the stalled reader was never closed"
        assert srv.call(lambda s, i=published: s.publish("feed", f"{i}:{payload}")) >= 1
        assert json.loads(recv_text(good))["data"] == f"{published}:{payload}"
        published += 1
    assert [e.user_id for e in slow] == ["stalled"]
    stats = srv.stats()
    assert stats.slow_consumer_closes == 1 and stats.topics == {"feed": 1}
    for _ in range(20):  # the others are not held up by the closed one
        assert srv.call(lambda s, i=published: s.publish("feed", f"{i}:{payload}")) == 1
        assert json.loads(recv_text(good))["data"] == f"{published}:{payload}"
        published += 1
    # The stalled reader reads again: what was in flight, then Close 1008.
    texts, code, reason = stalled.until_close(timeout=10)
    assert (code, reason) == (1008, "slow consumer")
    assert len(texts) - 1 < published  # (the Hello) the rest was discarded
    stalled.send_close(1008)
    assert stalled.at_eof()
    stalled.close()
    good.close()


def test_a_stalled_socket_is_dropped_close_timeout_after_its_close(serve: Serve) -> None:
    """The peer's Close is answered behind output that can never go: the socket is dropped
    ``close_timeout`` later instead of lingering forever."""
    config = ServerConfig(close_timeout=0.3, max_outbox_bytes=64 * 1024 * 1024)
    srv = serve(config)
    stalled = RawPeer.open(srv.port, "/ws?user_id=s", rcvbuf=4096, after=masked_frame(0x1, b"sub:big"))
    eventually(lambda: srv.stats().topics.get("big") == 1)
    for _ in range(2000):  # until the kernel and the transport are full
        srv.call(lambda s: s.publish("big", "y" * 65536))
        if srv.stats().outbox_bytes >= 4 * 65536:
            break
    # Output the socket cannot take stays in the core and counts there.
    assert srv.stats().outbox_bytes >= 4 * 65536
    (conn_id,) = srv.call(lambda s: s.core.engine.open_connections())
    stalled.send_close(1000)
    eventually(lambda: srv.stats().connections == 0)
    started = time.monotonic()
    eventually(lambda: conn_id not in srv.call(lambda s: s.core.connection_ids()), timeout=3)
    assert time.monotonic() - started <= config.close_timeout + 0.3
    assert stalled.at_eof()
    stalled.close()
