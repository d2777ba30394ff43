"""A cluster node as the adapters drive it: ``TankServer`` with ``config.broker``, on the fake clock.

WebSocket peers and HTTP requests are real bytes through ``Harness``; Redis's side is RESP built by
hand (``broker_support``). What these pin down: interest routing follows the engine's refcounts,
messages from other nodes reach the right local connections, local ones go out exactly once, and
the API answer says whether the other nodes were reached.
"""

from __future__ import annotations

import json

import h11
import pytest
from broker_support import PUB, SUB, Simple, envelope, message, parse_commands, reply
from wsproto.events import Message

from tank_core import BrokerConfig, Limits, ServerConfig
from tank_core.actions import AbortTransport, OpenConnection, PauseReading, ResumeReading
from tank_core.cluster.envelope import BROADCAST, DISCONNECT, PUBLISH, RELAY, SEND, decode_envelope
from tank_core.cluster.vocabulary import BrokerRole
from tank_core.notifications import BrokerDown, BrokerUp
from tank_core.testing import FakePeer, Harness

OTHER = "bbbbbbbbbbbbbbbb"


class Node:
    """A Harness whose broker actions the test carries out by hand (PUBSUB NUMSUB queries are
    answered with ``members`` as soon as they head the publishing connection's pipeline)."""

    def __init__(self, config: ServerConfig | None = None, *, seed: int = 0) -> None:
        config = config if config is not None else ServerConfig(broker=BrokerConfig())
        self.h = Harness(config, seed=seed)
        self.server = self.h.server
        link = self.server.broker
        assert link is not None
        self.link = link
        self.sub_written = bytearray()
        self.pub_log: list[list[bytes]] = []
        self.pub_unseen: list[list[bytes]] = []
        self.members = 1
        self._answering = False

    def connect(self, user_id: str) -> FakePeer:
        peer = self.h.connect(user_id)
        peer.take()  # the Hello frame
        return peer

    def conn_of(self, role: BrokerRole) -> int:
        """The id of the current Redis connection of ``role`` (0 when there is none)."""
        return self.server._broker_ids.get((role, self.link.generation), 0)

    def take_broker(self) -> list[OpenConnection]:
        """The connections opened since the last call; takes what was written to Redis."""
        opens = self.h.opens
        self.h.opens = []
        for action in opens:
            if self.server._broker_conns[action.conn_id][0] is PUB:
                self.pub_log.clear()
        for role in (SUB, PUB):
            conn_id = self.conn_of(role)
            if not conn_id or self.h.transports[conn_id].state not in ("open", "closing"):
                continue
            data = self.h.flush(conn_id)
            if role is PUB:
                new = parse_commands(data)
                self.pub_log += new
                self.pub_unseen += new
            else:
                self.sub_written += data
        if not self._answering:
            self._answering = True
            try:
                while self.pub_log and self.pub_log[0][0] == b"PUBSUB":
                    self.pub_log.pop(0)
                    self.redis(PUB, reply([self.link.channels.all, self.members]))
            finally:
                self._answering = False
        return opens

    def commands(self, role: BrokerRole) -> list[list[bytes]]:
        self.take_broker()
        if role is PUB:
            new, self.pub_unseen = self.pub_unseen, []
            return [c for c in new if c[0] != b"PUBSUB"]
        data = bytes(self.sub_written)
        self.sub_written.clear()
        return parse_commands(data)

    def opened(self, role: BrokerRole) -> list[object]:
        actions = self.h.opened(self.conn_of(role))
        self.take_broker()
        return actions  # type: ignore[return-value]

    def lost(self, role: BrokerRole, error: str | None = None) -> list[object]:
        actions = self.h.peer_closed(self.conn_of(role), error)
        self.take_broker()
        return actions  # type: ignore[return-value]

    def call(self, method: str, *args: object, **kw: object) -> list[object]:
        fn = getattr(self.server, method)
        result = fn(*args, now=self.h.now, wall_time=self.h.clock.wall_time, **kw)
        actions = result[1] if isinstance(result, tuple) else result
        self.h.apply(actions)
        self.take_broker()
        return actions  # type: ignore[no-any-return]

    def start_and_up(self) -> None:
        self.call("start")
        self.opened(SUB)
        self.opened(PUB)
        self.confirm()
        assert self.link.up

    def confirm(self) -> None:
        for command in self.commands(SUB):
            if command[0] in (b"SUBSCRIBE", b"UNSUBSCRIBE"):
                kind = command[0].lower()
                self.redis(SUB, b"".join(reply([kind, ch, 1]) for ch in command[1:]))

    def redis(self, role: BrokerRole, data: bytes) -> list[object]:
        actions = self.h.feed(self.conn_of(role), data)
        self.take_broker()
        return actions  # type: ignore[return-value]

    def ack(self, count: int | None = None, value: object = 1) -> list[list[bytes]]:
        """Answer the publishing connection in order, up to the ``count``-th PUBLISH."""
        self.take_broker()
        answered: list[list[bytes]] = []
        data = b""
        while self.pub_log and (count is None or len(answered) < count):
            command = self.pub_log.pop(0)
            if command[0] == b"PUBLISH":
                answered.append(command)
                data += reply(value)
            elif command[0] == b"PUBSUB":
                data += reply([self.link.channels.all, self.members])
            else:
                data += reply(Simple("OK"))
        if data:
            self.redis(PUB, data)
        return answered


def read_response(client: h11.Connection) -> tuple[int, dict[str, object]] | None:
    event = client.next_event()
    if event is h11.NEED_DATA:
        return None
    assert isinstance(event, h11.Response), event
    body = b""
    while True:
        part = client.next_event()
        if isinstance(part, h11.Data):
            body += part.data
        elif isinstance(part, h11.EndOfMessage):
            break
    client.start_next_cycle()
    return event.status_code, json.loads(body)


def request(path: str, body: dict[str, object]) -> tuple[h11.Connection, bytes]:
    client = h11.Connection(h11.CLIENT)
    data = json.dumps(body).encode()
    wire = client.send(
        h11.Request(method="POST", target=path,
                    headers=[("host", "localhost"), ("content-type", "application/json"),
                             ("content-length", str(len(data)))])
    ) or b""
    wire += (client.send(h11.Data(data=data)) or b"") + (client.send(h11.EndOfMessage()) or b"")
    return client, wire


# ---------------------------------------------------------------------------- interest routing


def test_interest_follows_local_subscribers_and_user_ids() -> None:
    node = Node()
    node.start_and_up()
    alice = node.connect("alice")
    assert node.commands(SUB) == [[b"SUBSCRIBE", b"tank:u:alice"]]
    alice.send_text("sub:news")
    assert node.commands(SUB) == [[b"SUBSCRIBE", b"tank:t:news"]]
    bob = node.connect("bob")
    bob.send_text("sub:news")  # the second subscriber: Redis already has the channel
    assert node.commands(SUB) == [[b"SUBSCRIBE", b"tank:u:bob"]]
    alice2 = node.connect("alice")
    assert node.commands(SUB) == []  # the user channel is held, not counted twice
    alice.send_text("unsub:news")
    assert node.commands(SUB) == []  # bob still there
    bob.send_close(1000)
    assert sorted(node.commands(SUB)) == [[b"UNSUBSCRIBE", b"tank:t:news", b"tank:u:bob"]]
    alice.vanish()
    assert node.commands(SUB) == []
    alice2.vanish()
    assert node.commands(SUB) == [[b"UNSUBSCRIBE", b"tank:u:alice"]]
    assert node.link.wanted_channels() == {b"tank:all"}


def test_subscriptions_that_wait_for_the_application_subscribe_on_the_verdict() -> None:
    node = Node(ServerConfig(broker=BrokerConfig(), authorize_subscriptions=True))
    node.start_and_up()
    peer = node.connect("u")
    node.commands(SUB)
    peer.send_text("sub:secret")
    assert node.commands(SUB) == []
    (ask,) = node.h.subscription_requests
    node.call("subscription_verdict", ask.conn_id, "secret", True)
    assert node.commands(SUB) == [[b"SUBSCRIBE", b"tank:t:secret"]]


# ---------------------------------------------------------------------------- from other nodes


def test_messages_from_other_nodes_reach_the_right_local_connections() -> None:
    node = Node()
    node.start_and_up()
    news = node.connect("n")
    news.send_text("sub:news")
    other = node.connect("o")
    node.confirm()
    node.redis(
        SUB,
        message(b"tank:t:news", envelope(PUBLISH, OTHER, 1, b'{"topic":"news","data":"hi"}'))
        + message(b"tank:all", envelope(BROADCAST, OTHER, 1, b"to all"))
        + message(b"tank:all", envelope(RELAY, OTHER, 2, b"relayed", exclude=3))
        + message(b"tank:u:o", envelope(SEND, OTHER, 1, b"just you")),
    )
    assert news.take() == ['{"topic":"news","data":"hi"}', "to all", "relayed"]
    assert other.take() == ["to all", "relayed", "just you"]
    node.redis(SUB, message(b"tank:u:o", envelope(DISCONNECT, OTHER, 2, b"")))
    other.read()
    assert other.close is not None and other.close.code == 1000
    assert node.server.stats().broker_received == 5


def test_our_own_echo_is_not_delivered_twice() -> None:
    node = Node()
    node.start_and_up()
    peer = node.connect("p")
    peer.send_text("sub:news")
    node.confirm()
    node.call("publish", "news", "once")
    (command,) = node.commands(PUB)
    node.redis(SUB, message(command[1], command[2]))  # Redis sends it back to us
    assert peer.take() == ['{"topic":"news","data":"once"}']


# ---------------------------------------------------------------------------- to other nodes


def test_publish_broadcast_send_and_disconnect_go_out_once_after_local_delivery() -> None:
    node = Node()
    node.start_and_up()
    peer = node.connect("p")
    peer.send_text("sub:news")
    node.confirm()
    node.call("publish", "news", "n")
    node.call("broadcast", "b", exclude=peer.conn_id)
    node.call("send_to_user", "zed", "s")
    node.call("disconnect_user", "zed")
    sent = [(c[1], decode_envelope(c[2])) for c in node.commands(PUB)]
    assert [(ch, e.kind, e.exclude, e.payload) for ch, e in sent if e] == [
        (b"tank:t:news", PUBLISH, None, b'{"topic":"news","data":"n"}'),
        (b"tank:all", BROADCAST, peer.conn_id, b"b"),
        (b"tank:u:zed", SEND, None, b"s"),
        (b"tank:u:zed", DISCONNECT, None, b""),
    ]
    assert peer.take() == ['{"topic":"news","data":"n"}']  # local first, and only here


def test_a_client_relay_goes_to_every_node_never_back_to_the_sender() -> None:
    node = Node()
    node.start_and_up()
    sender = node.connect("s")
    local = node.connect("l")
    node.commands(SUB)
    sender.send_text("hello all")
    (command,) = node.commands(PUB)
    decoded = decode_envelope(command[2])
    assert command[1] == b"tank:all" and decoded is not None
    assert (decoded.kind, decoded.exclude, decoded.payload) == (RELAY, sender.conn_id, b"hello all")
    assert sender.take() == [] and local.take() == ["hello all"]


def test_no_relay_means_no_relay_to_other_nodes_either() -> None:
    node = Node(ServerConfig(broker=BrokerConfig(), relay=False))
    node.start_and_up()
    sender = node.connect("s")
    sender.send_text("hello all")
    assert node.commands(PUB) == []


# ---------------------------------------------------------------------------- the API answer


def test_an_api_publish_is_answered_once_redis_acknowledged_it() -> None:
    node = Node()
    node.start_and_up()
    peer = node.connect("p")
    peer.send_text("sub:news")
    node.confirm()
    conn_id = node.h.accept()
    client, wire = request("/api/publish", {"topic": "news", "data": "x"})
    actions = node.h.feed(conn_id, wire)
    assert PauseReading(conn_id=conn_id) in actions
    assert node.h.transports[conn_id].paused
    assert node.h.flush(conn_id) == b""  # not before Redis answers
    node.ack(value=3)
    assert ResumeReading(conn_id=conn_id) in node.h.log
    assert not node.h.transports[conn_id].paused
    client.receive_data(node.h.flush(conn_id))
    assert read_response(client) == (200, {"delivered": 1, "broker": "up"})


def test_pipelined_api_calls_are_answered_in_order() -> None:
    node = Node()
    node.start_and_up()
    conn_id = node.h.accept()
    wires = b""
    clients = []
    for i in range(3):
        client, wire = request("/api/publish", {"topic": "t", "data": str(i)})
        clients.append(client)
        wires += wire
    node.h.feed(conn_id, wires)
    sent = []
    for _ in range(3):
        (command,) = node.commands(PUB)  # one at a time: the next waits for the answer
        sent.append(command)
        node.ack(value=0)
    assert [decode_envelope(c[2]).payload for c in sent] == [  # type: ignore[union-attr]
        b'{"topic":"t","data":"0"}', b'{"topic":"t","data":"1"}', b'{"topic":"t","data":"2"}',
    ]
    out = node.h.flush(conn_id)
    assert out.count(b'"broker":"up"') == 3


def test_while_down_the_api_says_so_at_once_and_local_delivery_goes_on() -> None:
    node = Node()
    node.start_and_up()
    assert node.h.http("GET", "/readyz").status == 200
    peer = node.connect("p")
    peer.send_text("sub:news")
    node.confirm()
    node.lost(SUB, error="reset")
    assert any(isinstance(n, BrokerDown) for n in node.h.notifications)
    answer = node.h.http("POST", "/api/publish", body=b'{"topic":"news","data":"x"}')
    assert json.loads(answer.body) == {"delivered": 1, "broker": "down"}
    answer = node.h.http("POST", "/api/broadcast", body=b'{"data":"y"}')
    assert json.loads(answer.body) == {"delivered": 1, "broker": "down"}
    answer = node.h.http("POST", "/api/disconnect", body=b'{"user_id":"nobody"}')
    assert json.loads(answer.body) == {"closed": 0, "broker": "down"}
    assert peer.take() == ['{"topic":"news","data":"x"}', "y"]
    stats = json.loads(node.h.http("GET", "/api/stats").body)
    assert stats["broker_up"] is False and stats["broker_buffered"] == 3
    metrics = node.h.http("GET", "/metrics").body.decode()
    assert "tank_broker_up 0" in metrics and "tank_broker_buffered 3" in metrics
    ready = node.h.http("GET", "/readyz")  # a load balancer sends no more clients here
    assert (ready.status, ready.body) == (503, b"broker down")
    assert node.h.http("GET", "/healthz").status == 200  # alive all the same


def test_a_publish_in_flight_when_redis_goes_is_answered_down() -> None:
    node = Node()
    node.start_and_up()
    conn_id = node.h.accept()
    client, wire = request("/api/publish", {"topic": "news", "data": "x"})
    node.h.feed(conn_id, wire)
    node.take_broker()
    node.lost(PUB, error="reset")
    assert not node.h.transports[conn_id].paused
    client.receive_data(node.h.flush(conn_id))
    assert read_response(client) == (200, {"delivered": 0, "broker": "down"})


def test_the_other_api_calls_answer_as_before() -> None:
    node = Node()
    node.start_and_up()
    answer = node.h.http("GET", "/api/stats")
    assert answer.status == 200 and json.loads(answer.body)["broker_up"] is True
    answer = node.h.http("POST", "/api/broadcast", body=b'{"data":"\\ud800"}')
    assert answer.status == 400


def test_without_a_broker_the_answers_are_unchanged() -> None:
    h = Harness(ServerConfig())
    assert json.loads(h.http("POST", "/api/publish", body=b'{"topic":"t","data":"x"}').body) == {
        "delivered": 0
    }
    stats = json.loads(h.http("GET", "/api/stats").body)
    assert not any(key.startswith("broker") for key in stats)
    assert "broker" not in h.http("GET", "/metrics").body.decode()
    assert h.server.start(now=h.now, wall_time=0.0) == []


# ---------------------------------------------------------------------------- time and lifecycle


def test_the_links_deadline_joins_the_servers() -> None:
    node = Node(ServerConfig(broker=BrokerConfig(probe_interval=0.5), heartbeat_interval=5,
                             heartbeat_timeout=15))
    node.start_and_up()
    assert node.server.next_deadline() == pytest.approx(node.h.now + 0.5)
    node.h.advance(0.5)
    assert node.commands(SUB) == [[b"PING"]]


def test_up_and_down_reach_the_application() -> None:
    node = Node()
    node.start_and_up()
    node.lost(SUB)
    node.h.advance(1.0)
    assert [o.host for o in node.take_broker()] == ["127.0.0.1", "127.0.0.1"]
    node.opened(SUB)
    node.opened(PUB)
    node.confirm()
    kinds = [type(n) for n in node.h.notifications if isinstance(n, BrokerUp | BrokerDown)]
    assert kinds == [BrokerUp, BrokerDown, BrokerUp]


def test_shutdown_leaves_redis_gracefully() -> None:
    node = Node()
    node.start_and_up()
    peer = node.connect("p")
    peer.send_text("sub:news")
    node.confirm()
    sub, pub = node.conn_of(SUB), node.conn_of(PUB)
    since = len(node.h.output_log)
    actions = node.call("shutdown")
    assert not any(isinstance(a, AbortTransport) for a in actions)
    # Both Redis connections close after what was queued for them (graceful).
    assert node.h.close_asked(sub, since) and node.h.close_asked(pub, since)
    assert node.link.next_deadline() is None
    leave = [c for c in node.commands(PUB) if c[1] == b"tank:all"]
    assert [decode_envelope(c[2]).kind for c in leave] == [b"l"]  # type: ignore[union-attr]


def test_redis_auth_with_the_server() -> None:
    node = Node(ServerConfig(broker=BrokerConfig(password="pw")))
    node.call("start")
    node.opened(PUB)
    node.opened(SUB)
    assert node.commands(PUB) == [[b"AUTH", b"pw"]]
    node.ack()
    assert node.commands(SUB)[0] == [b"AUTH", b"pw"]
    node.redis(SUB, reply(Simple("OK")) + reply([b"subscribe", b"tank:all", 1]))
    assert node.link.up


def test_the_answer_is_partial_while_a_node_known_before_is_missing() -> None:
    node = Node()
    node.members = 2
    node.start_and_up()
    assert node.server.stats().broker_nodes == 2
    node.lost(SUB)
    node.h.advance(1.0)
    node.members = 1  # the other node has not reconnected yet
    node.opened(SUB)
    node.opened(PUB)
    node.confirm()
    conn_id = node.h.accept()
    client, wire = request("/api/publish", {"topic": "news", "data": "x"})
    node.h.feed(conn_id, wire)
    node.ack()
    client.receive_data(node.h.flush(conn_id))
    assert read_response(client) == (200, {"delivered": 0, "broker": "partial"})
    stats = json.loads(node.h.http("GET", "/api/stats").body)
    assert (stats["broker_nodes"], stats["broker_nodes_expected"]) == (1, 2)


def test_relays_handled_in_later_turns_reach_redis_in_those_turns() -> None:
    # A read past the turn budget is handled at end_turn: its relays must be written to Redis
    # then, not at some later event.
    node = Node(ServerConfig(broker=BrokerConfig(),
                             limits=Limits(input_budget=500, max_frames_per_second=None)))
    node.start_and_up()
    sender = node.connect("s")
    node.commands(SUB)
    node.commands(PUB)
    node.h.auto_turns = False
    sender.send_raw(b"".join(sender.ws.send(Message(data=f"{i:03d}" + "x" * 97)) for i in range(12)))
    relayed = len(node.commands(PUB))
    assert relayed < 12  # the rest waits for the next turns
    while node.h.server.turn_wanted:
        node.h.apply(node.h.server.end_turn(node.h.now, wall_time=node.h.clock.wall_time))
    assert relayed + len(node.commands(PUB)) == 12
