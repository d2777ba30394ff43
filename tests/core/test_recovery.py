"""The recovery extension (issue 11): numbered publications for clients that offer
``tank.recovery.v1``, ``recover:`` replays with no gap and no duplicate, or says it cannot."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.events import AcceptConnection, Request

from tank_core import History, HistoryPolicy, ServerConfig
from tank_core.actions import AuthorizeSubscription
from tank_core.testing import FakeClock, FakePeer, Harness
from tank_core.wire.recovery import SUBPROTOCOL

HISTORY = History(keep=HistoryPolicy(size=5, ttl=60.0))


def make(history: History | None = HISTORY, **config: Any) -> Harness:
    return Harness(ServerConfig(history=history, **config), clock=FakeClock(100.0))


def opted(h: Harness, user: str) -> FakePeer:
    return h.connect(user, subprotocols=[SUBPROTOCOL])


def publish(h: Harness, topic: str, data: str) -> int:
    return h.server.publish(topic, data, now=h.now, wall_time=0.0)[0]


def json_messages(peer: FakePeer) -> list[dict[str, Any]]:
    return [json.loads(m) for m in peer.take() if isinstance(m, str) and m.startswith("{")]


def test_the_subprotocol_is_agreed_when_offered_with_or_without_a_history() -> None:
    h = make()
    peer = FakePeer(h)
    peer.send_raw(peer.ws.send(Request(host="t", target="/ws", subprotocols=["chat", SUBPROTOCOL])))
    (accepted,) = [e for e in peer.read() if isinstance(e, AcceptConnection)]
    assert accepted.subprotocol == SUBPROTOCOL
    # Without a history it is agreed too (a browser fails a handshake that ignores the
    # subprotocol it offered), and then nothing is numbered and nothing can be recovered.
    without = make(history=None)
    peer = opted(without, "w")
    assert peer.ws.state.name == "OPEN"
    peer.send_text('recover:{"topic":"t"}')
    assert json_messages(peer) == [{"type": "recovered", "topic": "t", "epoch": "", "offset": 0,
                                    "complete": True}]
    publish(without, "t", "plain")
    assert peer.take() == ['{"topic":"t","data":"plain"}']
    peer.send_text('recover:{"topic":"t","epoch":"","offset":0}')
    assert json_messages(peer)[-1]["complete"] is False
    other = FakePeer(without)
    other.send_raw(other.ws.send(Request(host="t", target="/ws", subprotocols=["chat"])))
    (accepted,) = [e for e in other.read() if isinstance(e, AcceptConnection)]
    assert accepted.subprotocol is None  # PROTOCOL.md [ref]: no other subprotocol


def test_opted_in_subscribers_get_offsets_and_the_others_the_reference_frame() -> None:
    h = make()
    plain, numbered = h.connect("plain"), opted(h, "numbered")
    for peer in (plain, numbered):
        peer.send_text("sub:news")
        peer.take()
    assert publish(h, "news", "one") == 2
    assert plain.take() == ['{"topic":"news","data":"one"}']  # byte for byte, PROTOCOL.md
    (message,) = json_messages(numbered)
    assert message == {"topic": "news", "data": "one", "offset": 1, "epoch": message["epoch"]}
    assert list(message) == ["topic", "data", "offset", "epoch"]  # the reference's keys first


def test_recover_replays_what_was_missed_then_goes_on_live() -> None:
    h = make()
    first = opted(h, "u")
    first.send_text("sub:t")
    publish(h, "t", "m1")
    (seen,) = json_messages(first)
    first.vanish()
    publish(h, "t", "m2")
    publish(h, "t", "m3")
    again = opted(h, "u")
    again.take()
    again.send_text("recover:" + json.dumps({"topic": "t", "epoch": seen["epoch"], "offset": 1}))
    publish(h, "t", "m4")
    got = json_messages(again)
    assert [m.get("data") for m in got] == ["m2", "m3", None, "m4"]
    assert [m.get("offset") for m in got] == [2, 3, 3, 4]
    assert got[2] == {"type": "recovered", "topic": "t", "epoch": seen["epoch"], "offset": 3,
                      "complete": True}


def test_recover_says_not_complete_when_history_cannot_cover_the_gap() -> None:
    h = make()
    peer = opted(h, "u")
    for i in range(8):  # size 5: offsets 1-3 are gone
        publish(h, "t", f"m{i + 1}")
    epoch = h.server.engine.history.read("t", since=None, epoch=None, limit=1, now=h.now).epoch
    for since, claimed in ((1, epoch), (6, "another-epoch")):
        peer.send_text("recover:" + json.dumps({"topic": "t", "epoch": claimed, "offset": since}))
        (marker,) = json_messages(peer)  # nothing replayed, only the verdict
        assert marker == {"type": "recovered", "topic": "t", "epoch": epoch, "offset": 8,
                          "complete": False}


def test_recover_is_a_relay_for_other_clients_and_a_bad_one_closes_1008() -> None:
    h = make()
    plain, other = h.connect("plain"), h.connect("other")
    plain.send_text('recover:{"topic":"t","epoch":"e","offset":0}')
    assert other.take()[-1] == 'recover:{"topic":"t","epoch":"e","offset":0}'
    peer = opted(h, "u")
    peer.send_text("recover:{not json")
    peer.read()
    assert peer.close is not None and int(peer.close.code) == 1008


def test_with_authorize_subscriptions_the_replay_waits_for_the_verdict() -> None:
    h = make(authorize_subscriptions=True)
    publish(h, "t", "m1")
    publish(h, "t", "m2")
    epoch = h.server.engine.history.read("t", since=None, epoch=None, limit=1, now=h.now).epoch
    peer = opted(h, "u")
    peer.take()
    actions = peer.send_text("recover:" + json.dumps({"topic": "t", "epoch": epoch, "offset": 1}))
    (ask,) = [a for a in actions if isinstance(a, AuthorizeSubscription)]
    assert json_messages(peer) == []
    h.apply(h.server.subscription_verdict(ask.conn_id, "t", True, now=h.now, wall_time=0.0))
    assert [m.get("offset") for m in json_messages(peer)] == [2, 2]  # m2, then recovered


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["publish", "publish", "drop", "recover", "wait"]),
                          st.integers(1, 40)), max_size=40))
def test_any_interleaving_gives_every_message_once_in_order_or_says_not_recovered(
    steps: list[tuple[str, int]],
) -> None:
    """A client that recovers after every drop: what it has is always a prefix of what was
    published, without gaps or duplicates, except right after a "not recovered", after which it
    reloads (takes the history's offset as its new start)."""
    h = make(history=History(keep=HistoryPolicy(size=6, ttl=10.0)))
    published: list[str] = []
    have = 0  # the offset the client has everything up to
    epoch: str | None = None

    def receive(client: FakePeer) -> None:
        nonlocal have, epoch
        for message in json_messages(client):
            if message.get("type") == "recovered":
                epoch = message["epoch"]
                if not message["complete"]:
                    have = message["offset"]  # the application reloads its state
                continue
            assert message["offset"] == have + 1, (message, have)  # no gap, no duplicate
            assert message["data"] == published[message["offset"] - 1]
            have, epoch = message["offset"], message["epoch"]

    peer: FakePeer | None = opted(h, "u")
    peer.take()
    peer.send_text('recover:{"topic":"t"}')  # a first subscription learns where t stands
    receive(peer)
    assert epoch == ""  # nothing published yet
    for kind, n in steps:
        if kind == "publish":
            published.append(f"m{len(published) + 1}")
            publish(h, "t", published[-1])
        elif kind == "wait":
            h.advance(n / 4)
        elif kind == "drop" and peer is not None:
            receive(peer)
            peer.vanish()
            peer = None
        elif kind == "recover" and peer is None:
            peer = opted(h, "u")
            peer.take()
            peer.send_text("recover:" + json.dumps({"topic": "t", "epoch": epoch, "offset": have}))
        if peer is not None:
            receive(peer)
    if peer is not None:
        receive(peer)
        assert have == len(published)  # connected at the end: everything, once, in order
