"""Per-topic history (ServerConfig.history): offsets that grow by one within an epoch, kept by
count and by age, read with ``complete`` telling whether a reader's sequence goes on unbroken."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tank_core import BrokerConfig, ConfigError, History, HistoryPolicy, ServerConfig
from tank_core.server.history_store import HistoryStore
from tank_core.testing import FakeClock, Harness


def store(size: int = 5, ttl: float = 10.0, max_topics: int = 100) -> HistoryStore:
    return HistoryStore(History(keep=HistoryPolicy(size=size, ttl=ttl), max_topics=max_topics),
                        "node")


def test_policies_by_longest_prefix_and_bad_configuration() -> None:
    chat, none = HistoryPolicy(size=1000, ttl=3600.0), None
    history = History(keep=HistoryPolicy(), prefixes={"chat:": chat, "chat:tmp:": none})
    assert history.policy_for("prices") == HistoryPolicy()
    assert history.policy_for("chat:room") == chat
    assert history.policy_for("chat:tmp:x") is None
    with pytest.raises(ConfigError, match="size"):
        HistoryPolicy(size=0)
    with pytest.raises(ConfigError, match="ttl"):
        HistoryPolicy(ttl=float("inf"))
    with pytest.raises(ConfigError, match="prefixes"):
        History(prefixes={"x": 5})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="cluster"):
        ServerConfig(history=History(), broker=BrokerConfig())


def test_offsets_grow_by_one_per_topic_and_old_ones_leave_by_count_and_age() -> None:
    s = store(size=3, ttl=10.0)
    assert [s.record("a", f"a{i}", now=float(i), wall_time=0.0) for i in range(5)] == [
        ("node-1", 1), ("node-1", 2), ("node-1", 3), ("node-1", 4), ("node-1", 5)]
    assert s.record("b", "b1", now=5.0, wall_time=0.0) == ("node-2", 1)  # its own numbering
    read = s.read("a", since=None, epoch=None, limit=10, now=5.0)
    assert [p.offset for p in read.publications] == [3, 4, 5]  # size 3
    read = s.read("a", since=None, epoch=None, limit=10, now=12.5)
    assert [p.offset for p in read.publications] == [4, 5]  # 3 is older than 10 s
    assert read.offset == 5 and read.epoch == "node-1"


def test_complete_only_when_the_reader_sequence_goes_on_unbroken() -> None:
    s = store(size=3)
    for i in range(1, 6):
        s.record("t", f"m{i}", now=0.0, wall_time=0.0)  # kept: 3, 4, 5
    def read(since: int, epoch: str = "node-1", limit: int = 10) -> tuple[list[int], bool, bool]:
        r = s.read("t", since=since, epoch=epoch, limit=limit, now=0.0)
        return [p.offset for p in r.publications], r.complete, r.more
    assert read(2) == ([3, 4, 5], True, False)  # 3 follows 2
    assert read(4) == ([5], True, False)
    assert read(5) == ([], True, False)  # up to date
    assert read(1) == ([3, 4, 5], False, False)  # 2 is gone: not recovered
    assert read(6) == ([], False, False)  # an offset never given
    assert read(4, epoch="node-9") == ([3, 4, 5], False, False)  # another epoch
    assert read(2, limit=2) == ([3, 4], True, True)
    nothing = s.read("never", since=0, epoch="node-1", limit=10, now=0.0)
    assert (nothing.epoch, nothing.complete) == ("", False)


def test_a_forgotten_topic_starts_a_new_epoch() -> None:
    s = store(max_topics=2)
    s.record("a", "x", now=0.0, wall_time=0.0)
    s.record("b", "x", now=0.0, wall_time=0.0)
    s.record("a", "y", now=0.0, wall_time=0.0)  # b is now the least recently published
    s.record("c", "x", now=0.0, wall_time=0.0)  # forgets b
    assert s.topics == 2
    assert s.record("b", "again", now=0.0, wall_time=0.0) == ("node-4", 1)
    assert not s.read("b", since=1, epoch="node-2", limit=10, now=0.0).complete


@given(st.lists(st.tuples(st.sampled_from(["publish", "read", "wait"]), st.integers(0, 12)),
                max_size=60))
def test_a_complete_read_is_exactly_what_followed_in_order(steps: list[tuple[str, int]]) -> None:
    """Any interleaving of publishes, reads and time passing: a read either says it is not
    complete, or gives every publication after the reader's offset, once and in order."""
    s = store(size=4, ttl=5.0)
    now = 0.0
    published: list[str] = []  # the model: everything ever published, offset = index + 1
    for kind, n in steps:
        if kind == "publish":
            published.append(f"m{len(published) + 1}")
            assert s.record("t", published[-1], now=now, wall_time=0.0) == ("node-1", len(published))
        elif kind == "wait":
            now += n / 2
        else:
            since = min(n, len(published))
            read = s.read("t", since=since, epoch="node-1", limit=100, now=now)
            got = [p.data for p in read.publications]
            if read.complete:
                assert got == published[since:]
            assert got == [d for d in published if d in got]  # never out of order or twice


def make(**config: Any) -> Harness:
    return Harness(ServerConfig(**config), clock=FakeClock(100.0))


def test_publishes_are_kept_and_read_through_the_api() -> None:
    h = make(history=History(keep=HistoryPolicy(size=10, ttl=60.0)))
    for i in range(3):
        h.server.publish("news", f"n{i}", now=h.now, wall_time=1_700_000_000.0 + i)
    answer = h.http("GET", "/api/history?topic=news&since=1&limit=1")
    assert answer.status == 200
    body = json.loads(answer.body)
    assert body == {
        "topic": "news", "epoch": body["epoch"], "offset": 3, "complete": False, "more": True,
        "publications": [{"offset": 2, "data": "n1", "time": 1_700_000_001.0}],
    } and body["epoch"]  # no epoch given: complete cannot be vouched for
    body = json.loads(h.http("GET", f"/api/history?topic=news&since=1&epoch={body['epoch']}").body)
    assert (body["complete"], [p["data"] for p in body["publications"]]) == (True, ["n1", "n2"])
    body = json.loads(h.http("GET", "/api/history?topic=" + quote("news")).body)
    assert [p["offset"] for p in body["publications"]] == [1, 2, 3]
    stats = h.server.stats()
    assert (stats.history_topics, stats.history_publications) == (1, 3)


@pytest.mark.parametrize(("target", "status", "says"), [
    ("/api/history", 400, "topic"),
    ("/api/history?topic=t&since=-1", 400, "since"),
    ("/api/history?topic=t&limit=0", 400, "limit"),
    ("/api/history?topic=t&limit=1001", 400, "limit"),
])
def test_bad_history_requests_are_400(target: str, status: int, says: str) -> None:
    h = make(history=History())
    answer = h.http("GET", target)
    assert answer.status == status and says in answer.body.decode()


def test_without_history_the_endpoint_is_404_and_outsiders_are_refused() -> None:
    assert make().http("GET", "/api/history?topic=t").status == 404
    h = make(history=History())
    assert h.http("GET", "/api/history?topic=t", peer_host="10.0.0.9").status == 403
    assert h.http("POST", "/api/history?topic=t", body=b"{}").status == 405


def test_presence_lists_who_is_subscribed_and_is_refused_on_a_cluster() -> None:
    h = make()
    a, b, c = h.connect("ann"), h.connect("ann"), h.connect("bob")
    for peer in (a, b, c):
        peer.send_text("sub:room")
    answer = json.loads(h.http("GET", "/api/presence?topic=room").body)
    assert answer == {"topic": "room", "connections": 3, "users": 2, "subscribers": [
        {"conn_id": a.conn_id, "user_id": "ann"}, {"conn_id": b.conn_id, "user_id": "ann"},
        {"conn_id": c.conn_id, "user_id": "bob"}]}
    b.send_text("unsub:room")
    c.vanish()
    assert h.server.engine.presence("room") == ((a.conn_id, "ann"),)
    assert h.http("GET", "/api/presence").status == 400
    assert h.http("GET", "/api/presence?topic=room", peer_host="10.1.1.1").status == 403
    cluster = Harness(ServerConfig(broker=BrokerConfig()), clock=FakeClock(0.0))
    assert cluster.http("GET", "/api/presence?topic=room").status == 501
