"""``authorize_subscriptions``: the application decides each new subscription (issue 3's
``authorize_subscribe`` hook), as a round trip through ``AuthorizeSubscription``."""

from __future__ import annotations

from tank_core import ServerConfig
from tank_core.actions import AuthorizeSubscription
from tank_core.notifications import TopicSubscribed
from tank_core.testing import Harness


def _harness() -> Harness:
    return Harness(ServerConfig(authorize_subscriptions=True))


def _publish(h: Harness, topic: str, data: str) -> int:
    delivered, actions = h.server.publish(topic, data, now=h.now, wall_time=h.clock.wall_time)
    h.apply(actions)
    return delivered


def _verdict(h: Harness, conn_id: int, topic: str, allowed: bool) -> None:
    h.apply(h.server.subscription_verdict(conn_id, topic, allowed, now=h.now, wall_time=0.0))


def test_subscription_waits_for_the_verdict_then_receives() -> None:
    h = _harness()
    a = h.connect("a")
    actions = a.send_text("sub:news")
    assert [x for x in actions if isinstance(x, AuthorizeSubscription)] == [
        AuthorizeSubscription(conn_id=a.conn_id, user_id="a", topic="news")
    ]
    assert _publish(h, "news", "early") == 0
    _verdict(h, a.conn_id, "news", True)
    assert any(isinstance(n, TopicSubscribed) and n.topic == "news" for n in h.notifications)
    assert _publish(h, "news", "late") == 1
    assert a.take()[-1] == '{"topic":"news","data":"late"}'


def test_refused_subscription_receives_nothing_and_nothing_is_sent() -> None:
    h = _harness()
    a = h.connect("a")
    a.take()
    a.send_text("sub:secret")
    _verdict(h, a.conn_id, "secret", False)
    assert _publish(h, "secret", "x") == 0
    assert a.take() == []
    assert h.server.stats().topics == {}


def test_repeated_sub_while_pending_asks_once() -> None:
    h = _harness()
    a = h.connect("a")
    a.send_text("sub:t")
    a.send_text("sub:t")
    assert len(h.subscription_requests) == 1
    _verdict(h, a.conn_id, "t", True)
    a.send_text("sub:t")  # already subscribed: idempotent, no new question
    assert len(h.subscription_requests) == 1


def test_unsub_before_the_verdict_cancels_it() -> None:
    h = _harness()
    a = h.connect("a")
    a.send_text("sub:t")
    a.send_text("unsub:t")
    _verdict(h, a.conn_id, "t", True)
    assert h.server.engine.subscribers_of("t") == ()


def test_verdict_for_a_gone_connection_is_ignored() -> None:
    h = _harness()
    a = h.connect("a")
    a.send_text("sub:t")
    a.vanish()
    assert h.server.subscription_verdict(a.conn_id, "t", True, now=h.now, wall_time=0.0) == []
    assert h.server.stats().topics == {}


def test_off_by_default_subscribes_at_once() -> None:
    h = Harness()
    a = h.connect("a")
    a.send_text("sub:t")
    assert h.subscription_requests == []
    assert h.server.engine.subscribers_of("t") == (a.conn_id,)
