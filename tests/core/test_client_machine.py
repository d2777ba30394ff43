"""Properties of the sans-IO client state machine (``tank_core.client.machine.TankClient``) on a fake clock.

The client is wired to a real ``TankServer`` through ``tank_core.testing.Harness``/``ClientLink``; a
``World`` drives server and clients on one ``FakeClock`` and checks, on **every** tick and after
every step (exact bounds, no tolerance):

* Heartbeat timeout: a ``HeartbeatTimedOut`` at a tick ``t`` needs ``t - L >= heartbeat_timeout``
  (``L`` = the last sign of life: the opening, or any received byte, partial frames included) and
  reports ``silent_for == t - L``; any tick of an open client at ``t >= L + heartbeat_timeout``
  reports it; an open client's ``next_deadline()`` is never later than ``L + heartbeat_timeout``.
  Together: no earlier than the timeout, no later than one tick after.
* Backoff: attempt ``n``'s delay lies in ``[0, min(max_delay, initial_delay * 2**(n-1))]``; ``n``
  counts failures since the last stable connection (one whose last sign of life came at least
  ``reconnect_stable_after`` after its open, and that did not end with 1013: its end starts ``n``
  again from 1); ``Opened.attempt`` counts the attempts since the previous connection ended; a
  waiting client's ``next_deadline()`` is exactly the scheduled time, and a tick emits
  ``OpenConnection`` iff it is at or after that time.
* Progress: a tick that returns nothing leaves ``next_deadline()`` None or later than ``now``.
* Topics: what the server receives on each connection is exactly one ``sub:T`` per held topic at
  the opening (in any order), then, in order, ``sub:``/``unsub:`` for each change made while open;
  the application messages it receives are the queued ones (in order) then the ones sent while open.
* Delivery: one ``MessageArrived`` per publish per subscriber, however many reconnects happened.

Durations in the ``World`` are dyadic and the clock stays inside one binade (65536..131072 s), where
``L + heartbeat_timeout`` is exact; ``test_tick_at_next_deadline_fires_the_timeout_for_any_float``
covers arbitrary floats on its own.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from tank_core import ClientConfig, LocalProtocolError, ServerConfig, TankClient
from tank_core.actions import AbortTransport, OpenConnection
from tank_core.client import (
    ClientAction,
    ClientState,
    Closed,
    HeartbeatReceived,
    MessageArrived,
    Opened,
    Reconnecting,
    Welcomed,
)
from tank_core.client import (
    HeartbeatTimedOut as ClientHeartbeatTimedOut,
)
from tank_core.client.machine import ClientEvent
from tank_core.events import BytesReceived, ConnectionOpened, TransportClosed
from tank_core.testing import ClientLink, FakeClock, FakePeer, Harness

URL = "ws://127.0.0.1:8080/ws"
CLIENT_HEARTBEAT = '{"type":"heartbeat"}'
#: The clock starts here and stays below 131072 (one binade: sums with dyadic durations are exact).
CLOCK_STARTS = st.floats(65536.0, 98304.0, allow_nan=False, allow_infinity=False)
#: Topics worth holding: empty, with the ``sub:`` prefix, a colon, non-ASCII, the word "topic", a number.
TOPICS = ["news", "a:b", "", "ü", "sub:x", "topic", "Heartbeat", "1"]
SERVER = ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=4.0)

COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def dyadic(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Multiples of 1/64 in [lo, hi]: exact when added to any clock value in the binade."""
    return st.integers(round(lo * 64), round(hi * 64)).map(lambda k: k / 64)


def _is_client_heartbeat(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == "heartbeat"


#: Application messages the server relays (the reference's case 4): not sub:/unsub:, not a heartbeat.
APP_TEXT = st.text(max_size=12).filter(
    lambda t: not t.startswith(("sub:", "unsub:")) and not _is_client_heartbeat(t)
)


# =========================================================================== observation helpers


class _Decoder:
    """The server side of one connection as wsproto sees it: the texts the client wrote, in order."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.texts: list[str] = []
        self._parts: list[str] = []
        self.closed = False

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.ws.receive_data(data)
            for ev in self.ws.events():
                if isinstance(ev, Request):
                    self.ws.send(AcceptConnection())
                elif isinstance(ev, TextMessage):
                    self._parts.append(ev.data)
                    if ev.message_finished:
                        self.texts.append("".join(self._parts))
                        self._parts = []
                elif isinstance(ev, CloseConnection):
                    self.closed = True
        except (WsLocalProtocolError, WsRemoteProtocolError):
            self.closed = True


class RecordingHarness(Harness):
    """A ``Harness`` that also decodes everything fed to the server, per connection."""

    def __init__(self, config: ServerConfig, *, clock: FakeClock, seed: int, generation: int) -> None:
        super().__init__(config, clock=clock, seed=seed)
        self.generation = generation
        self.decoders: dict[int, _Decoder] = {}

    def feed(self, conn_id: int, data: bytes):  # type: ignore[override]
        self.decoders.setdefault(conn_id, _Decoder()).feed(data)
        return super().feed(conn_id, data)

    def texts(self, conn_id: int) -> list[str]:
        """What the server read from ``conn_id``; a ``recover:`` (the client's subscription under
        the recovery extension, which the server agrees) is read as the ``sub:`` it stands for."""
        decoder = self.decoders.get(conn_id)
        return [_as_sub(t) for t in decoder.texts] if decoder is not None else []


def _as_sub(text: str) -> str:
    if text.startswith("recover:"):
        return "sub:" + json.loads(text.removeprefix("recover:"))["topic"]
    return text


class ObservedClient(TankClient):
    """The client under test, unchanged; it only records when bytes last arrived."""

    def __init__(self, config: ClientConfig, *, rng: random.Random) -> None:
        super().__init__(config, rng=rng)
        self.sign_of_life: float | None = None
        self.transport_lost_calls = 0

    def receive(self, event: ClientEvent) -> list[ClientAction]:
        before = self.state
        current = event.conn_id == self.conn_id
        out = super().receive(event)
        if isinstance(event, BytesReceived) and current and event.data and before in (
            ClientState.HANDSHAKING, ClientState.OPEN
        ):
            self.sign_of_life = event.now
        if isinstance(event, TransportClosed) and current:
            self.transport_lost_calls += 1
        return out


class Link(ClientLink):
    """``ClientLink`` plus a model of what the client must do: held topics, queue, attempts."""

    def __init__(self, world: World, client: ObservedClient) -> None:
        super().__init__(world.harness, client)
        self.world = world
        self.client: ObservedClient = client
        self.trace: list[tuple[float, object]] = []
        self.connects: list[float] = []
        #: Failures since the last stable connection (the backoff's n), and attempts since the
        #: previous connection ended (``Opened.attempt``).
        self.attempts = 0
        self.retries = 0
        self.retry_at: float | None = None
        self.opened_at: float | None = None
        self.last_code = 1006
        self.opened: list[tuple[int, int]] = []
        self.opening: dict[tuple[int, int], tuple[str, ...]] = {}
        self.expected_subs: dict[tuple[int, int], list[str]] = defaultdict(list)
        self.expected_app: dict[tuple[int, int], list[str]] = defaultdict(list)
        self.held: dict[str, None] = {}
        self.queue: list[str] = []
        self.closed = False
        self.closed_at = 0.0

    @property
    def key(self) -> tuple[int, int]:
        assert self.conn_id is not None
        return (self.harness.generation, self.conn_id)  # type: ignore[attr-defined]

    def _note(self, item: object) -> None:
        # What the client did to its connections; writes are ("write", conn_id, size): masking keys
        # and the handshake nonce come from os.urandom (RFC 6455 wants them unpredictable).
        super()._note(item)
        now = self.harness.now
        self.trace.append((now, item))
        if isinstance(item, OpenConnection):
            assert not self.closed, "OpenConnection after close()"
            self.connects.append(now)

    def run(self, actions: Iterable[ClientAction]) -> None:
        actions = list(actions)
        now = self.harness.now
        conn_id = self.conn_id
        start = len(self.events)
        super().run(actions)
        for ev in self.events[start:]:
            self.trace.append((now, ev))
            self._observe(now, conn_id, ev)

    def pump(self) -> None:
        super().pump()
        # Work around ClientLink keeping a lost transport's id (test_client_link_forgets_...):
        # the client is no longer using it, so a restarted server's ids must not be confused with it.
        if (
            self.conn_id is not None
            and self.server_reachable
            and self.harness.transports[self.conn_id].state in ("closed", "aborted")
            and self.client.state not in (ClientState.HANDSHAKING, ClientState.OPEN)
        ):
            self.conn_id = None

    def _observe(self, now: float, conn_id: int | None, ev: ClientAction) -> None:
        cfg = self.client.config
        match ev:
            case Opened(attempt=attempt):
                assert conn_id is not None
                assert attempt == self.retries, (attempt, self.retries)
                assert ev.reconnect == bool(self.opened)
                key = (self.harness.generation, conn_id)  # type: ignore[attr-defined]
                self.opened.append(key)
                self.opening[key] = tuple(self.held)
                self.expected_subs[key] = ["sub:" + t for t in self.held]
                self.expected_app[key] = list(self.queue)
                self.queue.clear()
                self.retries = 0
                self.retry_at = None
                self.opened_at = now
            case Closed(code=code, final=False):
                self.last_code = code
            case Reconnecting(delay=delay, attempt=attempt):
                opened_at, self.opened_at = self.opened_at, None
                if opened_at is not None and self.last_code != 1013:
                    heard = max(opened_at, self.client.sign_of_life or opened_at)
                    if heard - opened_at >= cfg.reconnect_stable_after:
                        self.attempts = 0
                self.attempts += 1
                self.retries += 1
                assert attempt == self.attempts, (attempt, self.attempts)
                bound = min(cfg.reconnect_max_delay, cfg.reconnect_initial_delay * 2 ** (attempt - 1))
                assert 0.0 <= delay <= bound, (attempt, delay, bound)
                if attempt == 1:
                    assert delay <= cfg.reconnect_initial_delay
                self.retry_at = now + delay
            case Closed(final=True):
                assert self.closed or not cfg.reconnect
            case _:
                pass

    # commands, mirrored in the model ------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        now = self.harness.now
        if self.closed:
            with pytest.raises(LocalProtocolError):
                self.client.subscribe(topic, now=now)
            return
        was_open = self.client.state is ClientState.OPEN
        new = topic not in self.held
        self.run(self.client.subscribe(topic, now=now))
        if new:
            self.held[topic] = None
            if was_open:
                self.expected_subs[self.key].append("sub:" + topic)

    def unsubscribe(self, topic: str) -> None:
        now = self.harness.now
        if self.closed:
            with pytest.raises(LocalProtocolError):
                self.client.unsubscribe(topic, now=now)
            return
        was_open = self.client.state is ClientState.OPEN
        held = topic in self.held
        self.run(self.client.unsubscribe(topic, now=now))
        if held:
            del self.held[topic]
            if was_open:
                self.expected_subs[self.key].append("unsub:" + topic)

    def send(self, text: str) -> bool:
        """Send; True when accepted. Raises in the test when the contract is broken."""
        now = self.harness.now
        if self.closed:
            with pytest.raises(LocalProtocolError):
                self.client.send(text, now=now)
            return False
        if self.client.state is ClientState.OPEN:
            self.run(self.client.send(text, now=now))
            self.expected_app[self.key].append(text)
            return True
        before = self.client.queued
        if len(self.queue) >= self.client.config.send_queue_limit:
            with pytest.raises(LocalProtocolError):
                self.client.send(text, now=now)
            assert self.client.queued == before
            return False
        assert self.client.send(text, now=now) == []
        self.queue.append(text)
        assert self.client.queued == before + 1
        return True

    def close(self) -> None:
        now = self.harness.now
        if self.closed:
            assert self.client.close(now=now) == []
            return
        was_open = self.client.state is ClientState.OPEN
        actions = self.client.close(now=now)
        self.closed = True
        self.closed_at = now
        finals = [a for a in actions if isinstance(a, Closed)]
        if was_open:
            # RFC 6455 §7.1.1: our Close goes out; the end comes with the server's Close, or
            # close_timeout later.
            assert finals == [] and actions == [] and self.client.buffered > 0
            assert self.client.state is ClientState.CLOSING
            assert self.client.next_deadline() == now + self.client.config.close_timeout
        else:
            assert len(finals) == 1 and finals[0].final
            assert self.client.state is ClientState.CLOSED and self.client.next_deadline() is None
        self.queue.clear()
        self.run(actions)


class World:
    """A server (restartable) and clients on one fake clock, checking the contract at every tick."""

    def __init__(self, server: ServerConfig = SERVER, *, clock_start: float, seed: int = 0) -> None:
        self.clock = FakeClock(clock_start)
        self.server_config = server
        self.seed = seed
        self.harnesses: list[RecordingHarness] = []
        self.harness = self._new_harness()
        self.links: list[Link] = []
        self.peers: list[FakePeer] = []
        self.frozen = False
        self.refusing = False
        self.published: list[tuple[str, str, dict[int, int]]] = []
        self._stall = 0

    def _new_harness(self) -> RecordingHarness:
        harness = RecordingHarness(
            self.server_config,
            clock=self.clock,
            seed=self.seed + len(self.harnesses),
            generation=len(self.harnesses),
        )
        self.harnesses.append(harness)
        return harness

    @property
    def now(self) -> float:
        return self.clock.now

    def add_client(self, config: ClientConfig, *, seed: int, start: bool = True) -> Link:
        link = Link(self, ObservedClient(config, rng=random.Random(seed)))
        link.server_reachable = not self.frozen
        link.refuse_connections = self.refusing
        self.links.append(link)
        if start:
            link.run(link.client.start(now=self.now))
            self.pump()
        return link

    # -------------------------------------------------------------- time

    def pump(self) -> None:
        for link in self.links:
            link.pump()
        if not self.frozen:
            for peer in self.peers:
                peer.read()

    def tick_client(self, link: Link) -> None:
        client, cfg, now = link.client, link.client.config, self.now
        state, life, retry_at = client.state, client.sign_of_life, link.retry_at
        connects = len(link.connects)
        actions = client.tick(now)
        start = len(link.events)
        link.run(actions)
        new = link.events[start:]
        fired = [e for e in new if isinstance(e, ClientHeartbeatTimedOut)]
        if fired:
            assert state is ClientState.OPEN and cfg.heartbeat and life is not None
            assert now - life >= cfg.heartbeat_timeout, ("timed out early", now, life)
            assert fired[0].silent_for == now - life
            event("heartbeat timeout fired")
        elif state is ClientState.OPEN and cfg.heartbeat:
            assert life is not None
            assert now < life + cfg.heartbeat_timeout, (
                "a tick past the heartbeat deadline did not report the timeout", now, life)
        if state is ClientState.CLOSING:
            gone = now >= link.closed_at + cfg.close_timeout
            assert (client.state is ClientState.CLOSED) == gone, ("close_timeout", now, link.closed_at)
            if gone:
                assert any(isinstance(a, AbortTransport) for a in actions)
        if state is ClientState.WAITING:
            assert retry_at is not None
            assert (len(link.connects) > connects) == (now >= retry_at), ("connect timing", now, retry_at)
        else:
            assert len(link.connects) == connects, ("OpenConnection while not waiting", state)
        if not actions:
            deadline = client.next_deadline()
            assert deadline is None or deadline > now, ("a no-op tick left a due deadline", now, deadline)

    def tick_all(self) -> None:
        if not self.frozen:
            self.harness.tick()
            self.pump()
        for link in self.links:
            self.tick_client(link)
        self.pump()

    def _deadlines(self) -> list[float]:
        found = [link.client.next_deadline() for link in self.links]
        if not self.frozen:
            found.append(self.harness.server.next_deadline())
        return [d for d in found if d is not None]

    def step(self) -> bool:
        """Move to the earliest deadline and tick everything there; False when nothing is due."""
        self.pump()
        deadlines = self._deadlines()
        if not deadlines:
            return False
        when = max(min(deadlines), self.now)
        self._stall = self._stall + 1 if when == self.now else 0
        assert self._stall < 50, f"no progress: next deadline stays at {when!r}"
        self.clock.jump_to(when)
        self.tick_all()
        return True

    def advance(self, seconds: float) -> None:
        """Tick at every deadline on the way, then at the target (an arbitrary time)."""
        target = self.now + seconds
        while True:
            self.pump()
            if not [d for d in self._deadlines() if d <= target]:
                break
            self.step()
        self.clock.jump_to(target)
        self.tick_all()

    def jump(self, seconds: float) -> None:
        """A late adapter: the clock moves without the deadlines on the way being served."""
        self.clock.advance(seconds)
        self.tick_all()

    def run_until(self, done: Callable[[], bool], *, steps: int = 5000) -> None:
        for _ in range(steps):
            self.pump()
            if done():
                return
            assert self.step(), "nothing scheduled, and the condition never came true"
        raise AssertionError("condition not reached")

    # -------------------------------------------------------------- the server's fate

    def freeze(self) -> None:
        self.frozen = True
        for link in self.links:
            link.server_reachable = False

    def thaw(self) -> None:
        self.frozen = False
        for link in self.links:
            link.server_reachable = True
        self.pump()

    def refuse(self, refusing: bool) -> None:
        self.refusing = refusing
        for link in self.links:
            link.refuse_connections = refusing

    def vanish(self, link: Link) -> None:
        """The server's side of this client's connection disappears (no closing handshake)."""
        self.thaw()
        if link.conn_id is not None and self.harness.transports[link.conn_id].state == "open":
            self.harness.peer_closed(link.conn_id)
        self.pump()

    def server_close(self, link: Link) -> None:
        """The operator closes this client (close 1000, a proper handshake)."""
        self.thaw()
        if link.conn_id is not None and self.harness.server.engine.is_open(link.conn_id):
            self.harness.apply(
                self.harness.server.close(
                    link.conn_id, now=self.now, wall_time=self.clock.wall_time
                )
            )
        self.pump()

    def restart(self, kind: str) -> None:
        """The server goes away (``kill``: sockets reset; ``shutdown``: goodbye and 1001) and a new
        process takes the port."""
        self.thaw()
        harness = self.harness
        if kind == "shutdown":
            harness.apply(harness.server.shutdown(now=self.now, wall_time=self.clock.wall_time))
            self.pump()
        for conn_id, transport in harness.transports.items():
            if transport.state in ("open", "closing"):
                harness.peer_closed(conn_id)
        self.pump()
        for link in self.links:
            assert link.client.state in (ClientState.WAITING, ClientState.CLOSED), link.client.state
            link.conn_id = None
            link.server_ids.clear()
        self.harness = self._new_harness()
        for link in self.links:
            link.harness = self.harness
        self.peers = []

    def publish(self, topic: str) -> None:
        """Publish a unique payload; every client holding the topic while open gets it once."""
        self.thaw()
        data = f"m{len(self.published)}"
        subscribers = set(self.harness.server.engine.subscribers_of(topic))
        expected = {}
        for index, link in enumerate(self.links):
            if link.client.state is ClientState.OPEN:
                assert (link.conn_id in subscribers) == (topic in link.held), (topic, link.held)
                expected[index] = int(topic in link.held)
            else:
                expected[index] = 0
        delivered, actions = self.harness.server.publish(
            topic, data, now=self.now, wall_time=self.clock.wall_time
        )
        assert delivered == len(subscribers)
        self.harness.apply(actions)
        self.pump()
        self.published.append((topic, data, expected))
        self.check_deliveries()

    # -------------------------------------------------------------- invariants

    def check_deliveries(self) -> None:
        envelopes = {
            json.dumps({"topic": topic, "data": data}, separators=(",", ":")): (topic, data, expected)
            for topic, data, expected in self.published
        }
        for index, link in enumerate(self.links):
            arrived = Counter(e.text for e in link.events if isinstance(e, MessageArrived))
            for envelope, (topic, data, expected) in envelopes.items():
                assert arrived[envelope] == expected[index], (index, topic, data, expected)
            for e in link.events:
                if isinstance(e, MessageArrived) and e.text in envelopes:
                    topic, data, _ = envelopes[e.text]
                    # An empty topic is falsy for the JS client: a plain message.
                    assert (e.topic, e.data) == ((topic, data) if topic else (None, None))

    def check(self) -> None:
        for link in self.links:
            client, cfg = link.client, link.client.config
            assert client.topics == tuple(link.held)
            assert client.queued == (0 if link.closed else len(link.queue))
            if client.state is ClientState.OPEN and cfg.heartbeat:
                deadline = client.next_deadline()
                assert client.sign_of_life is not None and deadline is not None
                assert deadline <= client.sign_of_life + cfg.heartbeat_timeout
            if client.state is ClientState.WAITING:
                assert client.next_deadline() == link.retry_at
            finals = sum(isinstance(e, Closed) and e.final for e in link.events)
            if link.closed:
                assert client.state in (ClientState.CLOSING, ClientState.CLOSED)
            if client.state is ClientState.CLOSING:
                assert client.next_deadline() == link.closed_at + cfg.close_timeout
                assert finals == 0
            if client.state is ClientState.CLOSED:
                assert client.next_deadline() is None
                assert finals == 1
            for key in link.opened:
                harness = self.harnesses[key[0]]
                texts = harness.texts(key[1])
                subs = [t for t in texts if t.startswith(("sub:", "unsub:"))]
                app = [t for t in texts if not t.startswith(("sub:", "unsub:")) and t != CLIENT_HEARTBEAT]
                want_subs, want_app = link.expected_subs[key], link.expected_app[key]
                # The opening batch: one sub: per held topic, in any order; then the changes in order.
                opening = len(link.opening[key])
                if len(subs) >= opening:
                    assert Counter(subs[:opening]) == Counter(want_subs[:opening]), (key, subs, want_subs)
                    subs = want_subs[:opening] + subs[opening:]
                if self.frozen:
                    assert subs == want_subs[: len(subs)], (key, subs, want_subs)
                    assert app == want_app[: len(app)], (key, app, want_app)
                else:
                    assert subs == want_subs, (key, subs, want_subs)
                    assert app == want_app, (key, app, want_app)

    def settle(self) -> None:
        """Server running and accepting: wait until every live client is open again."""
        self.thaw()
        self.refuse(False)
        self.run_until(
            lambda: all(link.closed or link.client.state is ClientState.OPEN for link in self.links)
        )
        self.pump()
        self.check()


def client_config(**overrides: object) -> ClientConfig:
    values: dict[str, object] = {
        "url": URL,
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 3.0,
        "reconnect_initial_delay": 0.25,
        "reconnect_max_delay": 2.0,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return ClientConfig(**values)  # type: ignore[arg-type]


@st.composite
def client_configs(draw: st.DrawFn, **overrides: object) -> ClientConfig:
    interval = draw(dyadic(0.25, 2.0))
    values: dict[str, object] = {
        "heartbeat_interval": interval,
        "heartbeat_timeout": interval + draw(dyadic(1.0, 4.0)),
        "reconnect_initial_delay": draw(dyadic(0.0625, 1.0)),
        "connect_timeout": draw(dyadic(0.5, 3.0)),
    }
    values["reconnect_max_delay"] = values["reconnect_initial_delay"] * draw(st.sampled_from([1, 2, 4, 8]))
    values.update(overrides)
    return client_config(**values)


# =========================================================================== ops (traces)


def apply_op(world: World, op: tuple) -> None:
    match op:
        case ("subscribe", i, topic):
            world.links[i].subscribe(topic)
        case ("unsubscribe", i, topic):
            world.links[i].unsubscribe(topic)
        case ("send", i, text):
            world.links[i].send(text)
        case ("publish", topic):
            world.publish(topic)
        case ("advance", seconds):
            world.advance(seconds)
        case ("jump", seconds):
            world.jump(seconds)
        case ("deadline",):
            world.step()
        case ("freeze",):
            world.freeze()
        case ("thaw",):
            world.thaw()
        case ("stall", seconds):
            world.freeze()
            world.advance(seconds)
            world.thaw()
        case ("vanish", i):
            world.vanish(world.links[i])
        case ("server_close", i):
            world.server_close(world.links[i])
        case ("restart", kind):
            world.restart(kind)
        case ("refuse", refusing):
            world.refuse(refusing)
        case ("close", i):
            world.links[i].close()
        case _:
            raise AssertionError(op)
    world.check()


def ops(
    n_clients: int, *, topics: bool = True, sends: bool = False, publish: bool = False,
    close: bool = False, min_size: int = 0, max_size: int = 30, topic_weight: int = 1,
) -> st.SearchStrategy[list[tuple]]:
    client = st.integers(0, n_clients - 1)
    reconnects = [
        st.tuples(st.just("vanish"), client),
        st.tuples(st.just("server_close"), client),
        st.tuples(st.just("restart"), st.sampled_from(["kill", "shutdown"])),
        st.tuples(st.just("stall"), st.floats(0.0, 10.0, allow_nan=False)),
    ]
    choices = [
        *reconnects,
        st.tuples(st.just("advance"), st.floats(0.0, 6.0, allow_nan=False)),
        st.tuples(st.just("jump"), st.floats(0.0, 3.0, allow_nan=False)),
        st.tuples(st.just("deadline")),
        st.tuples(st.just("freeze")),
        st.tuples(st.just("thaw")),
        st.tuples(st.just("vanish"), client),
        st.tuples(st.just("server_close"), client),
        st.tuples(st.just("restart"), st.sampled_from(["kill", "shutdown"])),
        st.tuples(st.just("refuse"), st.booleans()),
    ]
    if topics:
        choices += [
            st.tuples(st.just("subscribe"), client, st.sampled_from(TOPICS)),
            st.tuples(st.just("unsubscribe"), client, st.sampled_from(TOPICS)),
        ] * topic_weight
    if sends:
        choices.append(st.tuples(st.just("send"), client, APP_TEXT))
    if publish:
        choices.append(st.tuples(st.just("publish"), st.sampled_from(TOPICS[:3])))
    if close:
        choices.append(st.tuples(st.just("close"), client))
    # Reconnects weigh double: the properties are about what survives them.
    return st.lists(st.one_of(*choices, *reconnects), min_size=min_size, max_size=max_size)


def play(trace: list[tuple], *, configs: list[ClientConfig], clock_start: float, seed: int) -> World:
    world = World(clock_start=clock_start, seed=seed)
    for index, config in enumerate(configs):
        world.add_client(config, seed=seed + index)
    for op in trace:
        apply_op(world, op)
    world.settle()
    return world


# =========================================================================== heartbeat


STEP = st.one_of(
    st.tuples(st.just("deadline")),
    # Just before the next deadline (nothing may fire early), by a hair or by a little.
    st.tuples(
        st.sampled_from(["before", "before death"]),
        st.sampled_from([2.0**-30, 2.0**-20, 2.0**-10]) | st.floats(0.0, 0.1),
    ),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0, allow_nan=False)),
    st.tuples(st.just("bytes"), st.floats(0.0, 3.0, allow_nan=False), st.integers(1, 5)),
)
#: A text frame announcing 2**40 payload bytes: what follows it is a frame that never completes.
_ENDLESS_FRAME = b"\x81\x7f" + (2**40).to_bytes(8, "big")


@settings(max_examples=150, **COMMON)
@given(
    config=client_configs(),
    clock_start=CLOCK_STARTS,
    rounds=st.lists(
        st.tuples(st.floats(0.0, 3.0), st.lists(STEP, max_size=12)), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_heartbeat_timeout_no_earlier_than_timeout_no_later_than_one_tick(
    config: ClientConfig, clock_start: float, rounds: list[tuple[float, list[tuple]]], seed: int
) -> None:
    """Server frozen, or trickling the bytes of a frame that never ends, ticks at arbitrary times
    and at ``next_deadline()``: the timeout comes at the first tick ``>= L + timeout``, never before.
    (The per-tick checks live in ``World.tick_client``.)"""
    world = World(clock_start=clock_start, seed=seed)
    link = world.add_client(config, seed=seed)
    client = link.client
    for alive_for, steps in rounds:
        world.settle()
        assert client.sign_of_life == world.now
        # A live server (Pings and text heartbeats every second) never lets the timeout fire.
        opens, alive_start = len(link.opened), len(link.events)
        world.advance(alive_for * config.heartbeat_timeout)
        assert len(link.opened) == opens and client.state is ClientState.OPEN
        assert not any(isinstance(e, ClientHeartbeatTimedOut) for e in link.events[alive_start:])
        world.freeze()
        started = len(link.events)
        partial = False
        for step in steps:
            match step:
                case ("deadline",):
                    deadline = client.next_deadline()
                    assert deadline is not None
                    world.clock.jump_to(deadline)
                case ("before", seconds):
                    deadline = client.next_deadline()
                    assert deadline is not None
                    world.clock.jump_to(deadline - seconds)
                case ("before death", seconds):
                    assert client.sign_of_life is not None
                    world.clock.jump_to(client.sign_of_life + config.heartbeat_timeout - seconds)
                case ("tick", seconds):
                    world.clock.advance(seconds)
                case ("bytes", seconds, count):
                    world.clock.advance(seconds)
                    if client.state is not ClientState.OPEN:
                        break
                    chunk = (b"" if partial else _ENDLESS_FRAME) + b"a" * count
                    partial = True
                    assert client.conn_id is not None
                    link.receive(BytesReceived(conn_id=client.conn_id, data=chunk, now=world.now,
                                               wall_time=world.clock.wall_time))
                    assert client.sign_of_life == world.now
                    assert client.state is ClientState.OPEN
                    continue
            world.tick_client(link)
            if client.state is not ClientState.OPEN:
                break
        # Then an adapter that sleeps until next_deadline(): the timeout comes exactly on time.
        for _ in range(1000):
            if client.state is not ClientState.OPEN:
                break
            life = client.sign_of_life
            assert life is not None
            deadline = client.next_deadline()
            assert deadline is not None and deadline <= life + config.heartbeat_timeout
            world.clock.jump_to(deadline)
            world.tick_client(link)
            if client.state is not ClientState.OPEN:
                assert world.now == life + config.heartbeat_timeout
        timeouts = [e for e in link.events[started:] if isinstance(e, ClientHeartbeatTimedOut)]
        assert len(timeouts) == 1
        assert timeouts[0].silent_for >= config.heartbeat_timeout
        # The frozen server never saw the client's heartbeats; let it run again.
        world.thaw()
    world.settle()


@settings(max_examples=200, **COMMON)
@given(
    clock_start=st.floats(1e4, 1e7, allow_nan=False),
    timeout=st.floats(0.002, 100.0, allow_nan=False),
    ratio=st.floats(0.05, 0.95),
)
@example(clock_start=854421.8515250481, timeout=15.45908805880605, ratio=5 / 15.45908805880605)
def test_tick_at_next_deadline_fires_the_timeout_for_any_float(
    clock_start: float, timeout: float, ratio: float
) -> None:
    """Any float timeout and clock: an adapter that ticks at ``next_deadline()`` sees the timeout
    at ``fl(L + timeout)``, and a tick that does nothing moves the deadline.

    Regression (fixed in d3c980b): ``next_deadline()`` was ``last_seen + timeout``
    (rounded) but ``_tick_open`` tested ``now - last_seen >= timeout`` (exact); when the sum rounded
    down, the tick at the deadline did nothing and left ``next_deadline() == now`` (an adapter
    spins; ``ClientLink.advance`` hangs).
    """
    interval = timeout * ratio
    if interval <= 0 or not interval < timeout:
        return
    harness = Harness(SERVER, clock=FakeClock(clock_start))
    client = TankClient(
        ClientConfig(url=URL, user_id="u", heartbeat_interval=interval, heartbeat_timeout=timeout),
        rng=random.Random(0),
    )
    link = ClientLink(harness, client)
    link.run(client.start(now=harness.now))
    link.pump()
    assert client.state is ClientState.OPEN
    life = harness.now
    link.server_reachable = False
    fired_at = None
    for _ in range(200):
        deadline = client.next_deadline()
        assert deadline is not None and deadline <= life + timeout
        harness.clock.jump_to(deadline)
        actions = client.tick(deadline)
        link.run(actions)
        if any(isinstance(a, ClientHeartbeatTimedOut) for a in actions):
            fired_at = deadline
            break
        nxt = client.next_deadline()
        assert actions or (nxt is not None and nxt > deadline), (
            f"tick({deadline!r}) did nothing and next_deadline() is still {nxt!r} "
            f"(last sign of life {life!r}, timeout {timeout!r})"
        )
    assert fired_at is not None
    assert fired_at >= life + timeout
    assert fired_at - life <= timeout * (1 + 1e-9) + 1e-9


def test_tick_at_the_rounded_death_deadline_reports_the_timeout() -> None:
    """The minimal reproduction of the float bug above, as a plain test."""
    harness = Harness(SERVER, clock=FakeClock(854421.8515250481))
    client = TankClient(
        ClientConfig(url=URL, user_id="u", heartbeat_interval=5.0, heartbeat_timeout=15.45908805880605),
        rng=random.Random(0),
    )
    link = ClientLink(harness, client)
    link.run(client.start(now=harness.now))
    link.pump()
    link.server_reachable = False
    seen = []
    for _ in range(5):
        deadline = client.next_deadline()
        assert deadline is not None
        harness.clock.jump_to(deadline)
        seen += [type(a).__name__ for a in client.tick(deadline)]
    assert "HeartbeatTimedOut" in seen, (seen, client.next_deadline(), harness.now)


# =========================================================================== backoff


@settings(max_examples=150, **COMMON)
@given(
    clock_start=CLOCK_STARTS,
    initial=st.floats(0.01, 2.0, allow_nan=False),
    growth=st.floats(1.0, 64.0, allow_nan=False),
    phases=st.lists(
        st.tuples(
            st.integers(0, 8),  # failed attempts in this outage
            st.sampled_from(["deadline", "late", "early"]),
            st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
            st.sampled_from(["vanish", "server_close", "restart"]),
        ),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_backoff_delays_lie_within_their_bounds_and_reset_after_a_stable_connection(
    clock_start: float, initial: float, growth: float, phases: list[tuple], seed: int
) -> None:
    config = client_config(
        reconnect_initial_delay=initial, reconnect_max_delay=initial * growth, heartbeat_timeout=4.0
    )
    world = World(clock_start=clock_start, seed=seed)
    link = world.add_client(config, seed=seed)
    world.settle()
    for failures, mode, fractions, cause in phases:
        # Stable: the server (heartbeat every second) is heard from past reconnect_stable_after.
        world.advance(config.reconnect_stable_after + 2.0)
        assert link.client.state is ClientState.OPEN
        start = len(link.events)
        world.refuse(True)
        {"vanish": world.vanish, "server_close": world.server_close}.get(
            cause, lambda _link: world.restart("kill")
        )(link)
        assert link.client.state is ClientState.WAITING
        failed = 0
        for turn in range(1000):
            if failed >= failures:
                world.refuse(False)
            if link.client.state is ClientState.OPEN:
                break
            due = link.client.next_deadline()
            assert due == link.retry_at and due is not None
            connects = len(link.connects)
            fraction = fractions[turn % len(fractions)]
            if mode == "deadline":
                world.clock.jump_to(due)
            elif mode == "late":
                world.clock.jump_to(due + fraction * 3.0)
            elif turn % 2 == 0:  # early: before the due time (no OpenConnection allowed) ...
                world.clock.jump_to(world.now + fraction * (due - world.now))
            else:  # ... then exactly on it
                world.clock.jump_to(due)
            world.tick_all()
            if len(link.connects) > connects:
                assert link.connects[-1] >= due
                if mode == "deadline":
                    assert link.connects[-1] == due
                if link.client.state is not ClientState.OPEN:
                    failed += 1
            else:
                assert world.now < due
        assert link.client.state is ClientState.OPEN
        retries = [e for e in link.events[start:] if isinstance(e, Reconnecting)]
        assert [e.attempt for e in retries] == list(range(1, failures + 2))
        assert retries[0].delay <= initial
        for retry in retries:
            assert 0.0 <= retry.delay <= min(initial * growth, initial * 2 ** (retry.attempt - 1))
        opened = [e for e in link.events[start:] if isinstance(e, Opened)]
        assert opened == [Opened(reconnect=True, attempt=failures + 1)]
        event(f"failures per outage: {failures}")
    world.check()


def test_backoff_is_exponential_full_jitter_not_a_fixed_storm() -> None:
    """Many refused attempts: the bounds double up to the cap and the delays spread over them."""
    world = World(clock_start=70000.0, seed=3)
    link = world.add_client(client_config(reconnect_initial_delay=0.5, reconnect_max_delay=30.0), seed=3)
    world.settle()
    world.refuse(True)
    world.vanish(link)
    world.run_until(lambda: link.attempts >= 400, steps=100_000)
    retries = [e for e in link.events if isinstance(e, Reconnecting)]
    capped = [r.delay for r in retries if r.attempt >= 7]
    assert retries[0].attempt == 1 and retries[0].delay <= 0.5
    assert max(capped) <= 30.0 and max(capped) > 25.0 and min(capped) < 5.0
    assert len({round(r.delay, 6) for r in retries}) == len(retries)


# =========================================================================== topics


@settings(max_examples=120, **COMMON)
@given(
    configs=st.lists(client_configs(), min_size=1, max_size=2),
    trace=ops(2, min_size=6, max_size=30, topic_weight=4),
    clock_start=CLOCK_STARTS,
    seed=st.integers(0, 2**16),
)
def test_every_held_topic_is_resubscribed_exactly_once_per_reconnect(
    configs: list[ClientConfig], trace: list[tuple], clock_start: float, seed: int
) -> None:
    trace = [op for op in trace if op[0] not in ("vanish", "server_close", "subscribe", "unsubscribe")
             or op[1] < len(configs)]
    world = play(trace, configs=configs, clock_start=clock_start, seed=seed)
    for link in world.links:
        event(f"opens per client: {min(len(link.opened), 6)}")
        for key in link.opened:
            frames = [t for t in world.harnesses[key[0]].texts(key[1]) if t.startswith(("sub:", "unsub:"))]
            opening = link.opening[key]
            batch = frames[: len(opening)]
            assert Counter(batch) == Counter("sub:" + t for t in opening)
            assert all(n == 1 for n in Counter(batch).values())
        # The server holds exactly the client's topics on its live connection.
        assert link.conn_id is not None
        assert world.harness.server.engine.topics_of(link.conn_id) == frozenset(link.held)


@settings(max_examples=100, **COMMON)
@given(
    configs=st.lists(client_configs(), min_size=2, max_size=2),
    trace=ops(2, publish=True, min_size=6, max_size=30),
    clock_start=CLOCK_STARTS,
    seed=st.integers(0, 2**16),
)
def test_one_message_arrived_per_publish_per_subscriber_after_any_reconnects(
    configs: list[ClientConfig], trace: list[tuple], clock_start: float, seed: int
) -> None:
    world = World(clock_start=clock_start, seed=seed)
    links = [world.add_client(config, seed=seed + i) for i, config in enumerate(configs)]
    for link in links:
        link.subscribe("news")
    for op in trace:
        apply_op(world, op)
    world.settle()
    for link in links:
        link.subscribe("news")
    world.publish("news")
    expected = world.published[-1][2]
    assert expected == {0: 1, 1: 1}
    world.check_deliveries()
    for link in links:
        arrived = Counter(e.data for e in link.events if isinstance(e, MessageArrived) and e.topic)
        assert all(n == 1 for n in arrived.values()), arrived
        assert arrived[world.published[-1][1]] == 1
        event(f"opens per client: {min(len(link.opened), 6)}")


# =========================================================================== send queue, close


@settings(max_examples=100, **COMMON)
@given(
    limit=st.integers(1, 5),
    phases=st.lists(
        st.tuples(
            st.booleans(),  # connected during this phase?
            st.lists(st.tuples(APP_TEXT, st.floats(0.0, 1.5, allow_nan=False)), max_size=8),
            st.sampled_from(["vanish", "server_close"]),
        ),
        min_size=1,
        max_size=4,
    ),
    clock_start=CLOCK_STARTS,
    seed=st.integers(0, 2**16),
)
def test_send_while_disconnected_queues_in_order_then_raises_and_is_relayed_after_reconnect(
    limit: int, phases: list[tuple], clock_start: float, seed: int
) -> None:
    world = World(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=4.0, text_heartbeat=False),
                  clock_start=clock_start, seed=seed)
    observer = world.harness.connect("observer")
    observer.take()
    world.peers.append(observer)
    link = world.add_client(client_config(user_id="sender", send_queue_limit=limit), seed=seed)
    world.settle()
    accepted: list[str] = []
    refused = 0
    for connected, sends, cause in phases:
        if connected:
            world.settle()
        elif link.client.state is ClientState.OPEN:
            world.refuse(True)
            (world.vanish if cause == "vanish" else world.server_close)(link)
        for text, pause in sends:
            state = link.client.state
            if link.send(text):
                accepted.append(text)
            else:
                refused += 1
                assert state is not ClientState.OPEN and link.client.queued == limit
            if state is not ClientState.OPEN:
                world.advance(pause)  # attempts keep failing, the queue stays
                assert link.client.state is not ClientState.OPEN
                assert link.client.queued == len(link.queue)
        world.check()
    world.settle()
    relayed = [m for m in observer.take() if m != "Server is shutting down"]
    assert relayed == accepted
    event(f"sends refused: {min(refused, 3)}")


@settings(max_examples=100, **COMMON)
@given(
    when=st.sampled_from(["idle", "connecting", "handshaking", "open", "waiting", "frozen-open"]),
    queued=st.lists(APP_TEXT, max_size=3),
    later=st.floats(0.0, 120.0, allow_nan=False),
    clock_start=CLOCK_STARTS,
    seed=st.integers(0, 2**16),
)
def test_close_is_final(
    when: str, queued: list[str], later: float, clock_start: float, seed: int
) -> None:
    world = World(clock_start=clock_start, seed=seed)
    link = world.add_client(client_config(), seed=seed, start=False)
    client = link.client
    link.subscribe("news")
    now = world.now
    if when == "connecting":
        actions = client.start(now=now)  # the adapter has not answered OpenConnection yet
        assert client.state is ClientState.CONNECTING
    elif when != "idle":
        if when == "handshaking":
            world.freeze()
        elif when == "waiting":
            world.refuse(True)
        link.run(client.start(now=now))
        world.pump()
        if when == "frozen-open":
            world.freeze()
    expected_state = {
        "idle": ClientState.IDLE, "connecting": ClientState.CONNECTING,
        "handshaking": ClientState.HANDSHAKING, "open": ClientState.OPEN,
        "waiting": ClientState.WAITING, "frozen-open": ClientState.OPEN,
    }[when]
    assert client.state is expected_state
    for text in queued:
        link.send(text)
    connects = len(link.connects)
    link.close()
    if when == "connecting":
        assert actions and isinstance(actions[0], OpenConnection)
        attempt, wall = actions[0].conn_id, world.clock.wall_time
        # A late answer to the dropped attempt:
        assert client.receive(ConnectionOpened(conn_id=attempt, now=world.now, wall_time=wall)) == []
        assert client.receive(TransportClosed(conn_id=attempt, now=world.now, wall_time=wall)) == []
    for command in (
        lambda: client.subscribe("x", now=world.now),
        lambda: client.unsubscribe("news", now=world.now),
        lambda: client.send("hi", now=world.now),
        lambda: client.start(now=world.now),
    ):
        with pytest.raises(LocalProtocolError):
            command()
    link.close()  # idempotent
    world.check()
    close_timeout = client.config.close_timeout
    if when == "frozen-open":
        # The server never answers while frozen: close_timeout later the connection is dropped.
        world.advance(later)
        assert (client.state is ClientState.CLOSED) == (later >= close_timeout)
    if when == "open":
        world.pump()  # the server's Close comes straight back
        assert client.state is ClientState.CLOSED
    world.thaw()
    world.refuse(False)
    world.advance(later)
    world.advance(60.0)
    world.check()
    assert len(link.connects) == connects
    assert client.state is ClientState.CLOSED
    assert client.next_deadline() is None
    finals = [(t, e) for t, e in link.trace if isinstance(e, Closed) and e.final]
    assert len(finals) == 1 and isinstance(link.events[-1], Closed) and link.events[-1].final
    ended_at = finals[0][0]
    if when == "open":
        assert ended_at == link.closed_at and finals[0][1].code == 1000
    elif when == "frozen-open":
        # Ended by the server's answer on thaw, or by close_timeout, whichever came first.
        assert ended_at == link.closed_at + min(later, close_timeout)
    else:
        assert ended_at == link.closed_at
    if when in ("open", "frozen-open"):
        assert link.conn_id is None
        # One drop: an abort (close_timeout passed without the server's Close), else a close
        # once our last frames were taken.
        drops = [a for _, a in link.trace
                 if isinstance(a, AbortTransport) or (isinstance(a, tuple) and a[0] == "close")]
        aborted = when == "frozen-open" and later >= close_timeout
        assert len(drops) == 1 and isinstance(drops[0], AbortTransport) == aborted, drops
    # Nothing queued survives close(), nothing reaches the server after it.
    assert client.queued == 0


# =========================================================================== what arrives


def _reject_constant(name: str) -> object:
    raise ValueError(f"JSON.parse rejects {name}")


def js_classify(text: str, held: Iterable[str]) -> tuple[str | None, object]:
    """tank-websocket.js 2.0.3 (PROTOCOL.md, last section), with JSON.parse's grammar."""
    index = text.find("topic")
    if index <= 0:
        return None, None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    topic = value.get("topic")
    if isinstance(topic, str) and topic and topic in set(held):
        return topic, value.get("data")
    return None, None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def envelopes(draw: st.DrawFn, held: list[str]) -> str:
    topics = st.sampled_from([*TOPICS, "nope", "NEWS", "news "])
    if held:
        topics = st.sampled_from(held) | topics
    topic = draw(topics | JSON_VALUES)
    fields: list[tuple[str, object]] = [("topic", topic)]
    if draw(st.booleans()):
        fields.append(("data", draw(JSON_VALUES)))
    for key in draw(st.lists(st.sampled_from(["x", "topic", "data", "type"]), max_size=2)):
        fields.append((key, draw(topics if key == "topic" else JSON_VALUES)))
    fields = draw(st.permutations(fields))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    ascii_only = draw(st.booleans())
    body = ",".join(  # keep duplicate keys (both parsers keep the last)
        json.dumps(k, ensure_ascii=ascii_only) + separators[1]
        + json.dumps(v, ensure_ascii=ascii_only, separators=separators)
        for k, v in fields
    )
    text = "{" + body + "}"
    variant = draw(st.sampled_from(["plain"] * 4 + ["spaces", "truncated", "nan", "array", "prefix"]))
    if variant == "spaces":
        text = draw(st.sampled_from([" ", "\n", "\t "])) + text + draw(st.sampled_from(["", " ", "\r\n"]))
    elif variant == "truncated":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif variant == "nan":
        text = text[:-1] + ',"data":' + draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])) + "}"
    elif variant == "array":
        text = "[" + text + "]"
    elif variant == "prefix":
        text = draw(st.sampled_from(["topic", "x", "topic:"])) + text
    return text


@st.composite
def classification_cases(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    held = draw(st.lists(st.sampled_from(TOPICS), unique=True, max_size=5))
    texts = draw(st.lists(
        st.one_of(
            envelopes(held),
            envelopes(held),
            st.text(max_size=30),
            st.sampled_from([
                "heartbeat", "Heartbeat", "heartbeat ", "topic", '"topic"', '{"topic":"news"}',
                '{"topic":"news","data":NaN}', "Server is shutting down", '{"type":"heartbeat"}',
                '["topic","news"]', '{"topic":["news"],"data":1}', '{"topic":"","data":1}',
                '{"topic":1,"data":2}',
            ]),
        ),
        min_size=1,
        max_size=12,
    ))
    return held, texts


@settings(max_examples=200, **COMMON)
@given(case=classification_cases(), clock_start=CLOCK_STARTS)
def test_topic_classification_mirrors_the_js_client(
    case: tuple[list[str], list[str]], clock_start: float
) -> None:
    held, texts = case
    world = World(clock_start=clock_start)
    link = world.add_client(client_config(user_id="c"), seed=0)
    for topic in held:
        link.subscribe(topic)
    world.settle()
    harness, conn_id = world.harness, link.conn_id
    assert conn_id is not None
    for text in texts:
        start = len(link.events)
        harness.apply(harness.server.send(conn_id, text, now=world.now, wall_time=world.clock.wall_time))
        link.pump()
        new = link.events[start:]
        if text == "heartbeat":
            assert new == [HeartbeatReceived()]
            continue
        assert len(new) == 1 and isinstance(new[0], MessageArrived), new
        arrived = new[0]
        assert arrived.text == text
        topic, data = js_classify(text, held)
        assert (arrived.topic, arrived.data) == (topic, data), (text, held)
        event("topic message" if topic else "plain message")


def test_json_parse_failures_are_plain_messages() -> None:
    """JSON.parse rejects NaN/Infinity, so the JS client treats these as plain messages."""
    world = World(clock_start=70000.0)
    link = world.add_client(client_config(user_id="c"), seed=0)
    link.subscribe("news")
    world.settle()
    harness = world.harness
    for text in ['{"topic":"news","data":NaN}', '{"topic":"news","data":-Infinity}']:
        assert link.conn_id is not None
        harness.apply(harness.server.send(link.conn_id, text, now=world.now, wall_time=world.clock.wall_time))
        link.pump()
        assert link.events[-1] == MessageArrived(text=text, topic=None, data=None), link.events[-1]


def _reconnect(world: World, link: Link, cause: str) -> None:
    if cause in ("kill", "shutdown"):
        world.restart(cause)
    else:
        (world.vanish if cause == "vanish" else world.server_close)(link)
    world.settle()


def _welcomes(world: World, link: Link) -> tuple[list[Welcomed], list[str], list[MessageArrived]]:
    welcomed = [e for e in link.events if isinstance(e, Welcomed)]
    hellos = [e for e in link.events if isinstance(e, MessageArrived) and e.text.startswith("Hello, ")]
    # The id each connection got, from the server's ClientConnected notifications.
    named = {
        (h.generation, n.conn_id): n.user_id
        for h in world.harnesses
        for n in h.notifications
        if type(n).__name__ == "ClientConnected"
    }
    return welcomed, [named[key] for key in link.opened], hellos


@settings(max_examples=60, **COMMON)
@given(
    causes=st.lists(st.sampled_from(["vanish", "server_close", "kill", "shutdown"]), min_size=1, max_size=3),
    clock_start=CLOCK_STARTS,
)
def test_each_reconnect_hello_is_welcomed_with_the_id_the_server_gave(
    causes: list[str], clock_start: float
) -> None:
    """No ``user_id`` configured: the server invents one per connection. Every Hello frame →
    one ``Welcomed`` with that connection's id (never a ``MessageArrived``); ``client.user_id``
    follows the current connection.

    Regression (fixed in d3c980b): ``_fragment`` welcomed only while ``self.user_id is None``, so
    each reconnect's Hello (with a new id) arrived as a plain message and ``client.user_id`` kept
    the first connection's id.
    """
    world = World(clock_start=clock_start)
    link = world.add_client(client_config(), seed=0)
    world.settle()
    for cause in causes:
        _reconnect(world, link, cause)
    welcomed, ids, hellos = _welcomes(world, link)
    assert len(ids) == len(causes) + 1
    assert welcomed[0].user_id == ids[0]
    assert hellos == []
    assert [w.user_id for w in welcomed] == ids
    assert link.client.user_id == ids[-1]


@settings(max_examples=60, **COMMON)
@given(
    user_id=st.text(min_size=1, max_size=12),
    causes=st.lists(st.sampled_from(["vanish", "server_close", "kill", "shutdown"]), max_size=2),
    clock_start=CLOCK_STARTS,
)
def test_hello_frame_is_welcomed_when_the_user_id_is_configured(
    user_id: str, causes: list[str], clock_start: float
) -> None:
    """A configured ``user_id``: each Hello frame → ``Welcomed(user_id)``, not a ``MessageArrived``.

    Regression (same cause as above): with ``user_id`` set, ``Welcomed`` was never emitted and
    every Hello reached the application as a plain message.
    """
    world = World(clock_start=clock_start)
    link = world.add_client(client_config(user_id=user_id), seed=0)
    world.settle()
    for cause in causes:
        _reconnect(world, link, cause)
    welcomed, ids, hellos = _welcomes(world, link)
    assert ids == [user_id] * (len(causes) + 1)
    assert hellos == []
    assert [w.user_id for w in welcomed] == ids
    assert link.client.user_id == user_id


@settings(max_examples=60, **COMMON)
@given(
    user_id=st.text(min_size=1, max_size=12),
    token=st.none() | st.text(max_size=12),
    query=st.sampled_from(["", "?user_id=other&k=v", "?token=old", "?k=a+b%20c"]),
)
def test_user_id_and_token_reach_the_server_verbatim(user_id: str, token: str | None, query: str) -> None:
    harness = Harness(ServerConfig(authenticate=True), clock=FakeClock(70000.0), authorize=True)
    client = TankClient(ClientConfig(url=URL + query, user_id=user_id, token=token), rng=random.Random(0))
    link = ClientLink(harness, client)
    link.run(client.start(now=harness.now))
    link.pump()
    assert client.state is ClientState.OPEN
    (ask,) = harness.authorization_requests
    request = ask.request
    assert request.user_id == user_id
    assert [v for k, v in request.query if k == "user_id"] == [user_id]
    if token is not None:
        assert [v for k, v in request.query if k == "token"] == [token]
    elif "token=old" in query:
        assert request.query_value("token") == "old"
    if "k=" in query:
        assert request.query_value("k") == ("v" if "k=v" in query else "a b c")
    assert link.conn_id is not None
    assert harness.server.engine.user_of(link.conn_id) == user_id


# =========================================================================== determinism, purity


def _forbid(name: str) -> Callable[..., object]:
    def forbidden(*_args: object, **_kwargs: object) -> object:
        raise AssertionError(f"the client read {name}: time comes only from the caller")

    return forbidden


@settings(max_examples=40, **COMMON)
@given(
    configs=st.lists(client_configs(), min_size=1, max_size=2),
    trace=ops(2, sends=True, publish=True, close=True, max_size=25),
    clock_start=CLOCK_STARTS,
    seed=st.integers(0, 2**16),
)
def test_same_seed_and_trace_give_the_same_actions_without_reading_a_clock(
    configs: list[ClientConfig], trace: list[tuple], clock_start: float, seed: int
) -> None:
    trace = [op for op in trace if len(op) < 2 or not isinstance(op[1], int) or op[1] < len(configs)]
    with ExitStack() as stack:
        for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
            stack.enter_context(mock.patch(f"time.{name}", _forbid(f"time.{name}")))
        for name in ("random", "uniform", "randint", "choice", "getrandbits", "randrange", "shuffle"):
            stack.enter_context(mock.patch(f"random.{name}", _forbid(f"random.{name}")))
        first = play(trace, configs=configs, clock_start=clock_start, seed=seed)
        second = play(trace, configs=configs, clock_start=clock_start, seed=seed)
    assert time.monotonic() > 0  # restored
    for a, b in zip(first.links, second.links, strict=True):
        assert a.trace == b.trace
        assert a.events == b.events
    received_a = [(h.generation, c, d.texts) for h in first.harnesses for c, d in h.decoders.items()]
    received_b = [(h.generation, c, d.texts) for h in second.harnesses for c, d in h.decoders.items()]
    assert received_a == received_b
    # The jitter comes from the injected rng: another seed, another first delay.
    firsts = []
    for rng_seed in (seed, seed + 1):
        other = World(clock_start=clock_start, seed=seed)
        link = other.add_client(configs[0], seed=rng_seed)
        other.settle()
        other.vanish(link)
        firsts.append(next(e.delay for e in link.events if isinstance(e, Reconnecting)))
    assert firsts[0] != firsts[1]


# =========================================================================== ClientLink itself


def test_client_link_forgets_a_lost_transport() -> None:
    """When the server side of the connection is gone, ``ClientLink.pump`` should report it once.

    Regression: ``pump`` reported the loss (``TransportClosed``) but kept ``conn_id`` (the client
    emits no ``AbortTransport`` for a transport that is already gone), then looped 100 times
    reporting it again, and did so on every later ``pump`` until the next ``OpenConnection``.
    """
    harness = Harness(SERVER, clock=FakeClock(70000.0))
    client = ObservedClient(client_config(user_id="u"), rng=random.Random(0))
    link = ClientLink(harness, client)
    link.run(client.start(now=harness.now))
    link.pump()
    assert link.conn_id is not None
    harness.peer_closed(link.conn_id)
    link.pump()
    link.pump()
    assert client.state is ClientState.WAITING
    assert client.transport_lost_calls == 1
    assert link.conn_id is None


# =========================================================================== everything together


class ClientMachine(RuleBasedStateMachine):
    """Two clients (one without a user id, one with), a server that freezes, restarts, refuses,
    closes clients and publishes; topics, sends and closes in any order. ``World`` checks the
    heartbeat, backoff and progress bounds on every tick; the invariants below after every rule."""

    @initialize(
        configs=st.lists(client_configs(), min_size=2, max_size=2),
        clock_start=CLOCK_STARTS,
        seed=st.integers(0, 2**16),
    )
    def setup(self, configs: list[ClientConfig], clock_start: float, seed: int) -> None:
        self.world = World(clock_start=clock_start, seed=seed)
        self.world.add_client(configs[0], seed=seed)
        self.world.add_client(client_config(
            user_id="b", **{k: getattr(configs[1], k) for k in (
                "heartbeat_interval", "heartbeat_timeout", "reconnect_initial_delay",
                "reconnect_max_delay", "connect_timeout")}, send_queue_limit=3), seed=seed + 1)

    @rule(i=st.integers(0, 1), topic=st.sampled_from(TOPICS))
    def subscribe(self, i: int, topic: str) -> None:
        apply_op(self.world, ("subscribe", i, topic))

    @rule(i=st.integers(0, 1), topic=st.sampled_from(TOPICS))
    def unsubscribe(self, i: int, topic: str) -> None:
        apply_op(self.world, ("unsubscribe", i, topic))

    @rule(i=st.integers(0, 1), text=APP_TEXT)
    def send(self, i: int, text: str) -> None:
        apply_op(self.world, ("send", i, text))

    @rule(topic=st.sampled_from(TOPICS[:3]))
    def publish(self, topic: str) -> None:
        apply_op(self.world, ("publish", topic))

    @rule(seconds=st.floats(0.0, 6.0, allow_nan=False))
    def advance(self, seconds: float) -> None:
        apply_op(self.world, ("advance", seconds))

    @rule(seconds=st.floats(0.0, 3.0, allow_nan=False))
    def jump(self, seconds: float) -> None:
        apply_op(self.world, ("jump", seconds))

    @rule()
    def deadline(self) -> None:
        apply_op(self.world, ("deadline",))

    @rule()
    def freeze(self) -> None:
        apply_op(self.world, ("freeze",))

    @rule()
    def thaw(self) -> None:
        apply_op(self.world, ("thaw",))

    @rule(seconds=st.floats(0.0, 10.0, allow_nan=False))
    def stall(self, seconds: float) -> None:
        apply_op(self.world, ("stall", seconds))

    @rule(i=st.integers(0, 1), how=st.sampled_from(["vanish", "server_close"]))
    def drop(self, i: int, how: str) -> None:
        apply_op(self.world, (how, i))

    @rule(kind=st.sampled_from(["kill", "shutdown"]))
    def restart(self, kind: str) -> None:
        apply_op(self.world, ("restart", kind))

    @rule(refusing=st.booleans())
    def refuse(self, refusing: bool) -> None:
        apply_op(self.world, ("refuse", refusing))

    @precondition(lambda self: not self.world.links[1].closed)
    @rule()
    def close_b(self) -> None:
        apply_op(self.world, ("close", 1))

    @rule()
    def settle(self) -> None:
        self.world.settle()
        for link in self.world.links:
            if not link.closed:
                assert link.conn_id is not None
                assert self.world.harness.server.engine.topics_of(link.conn_id) == frozenset(link.held)

    @invariant()
    def delivered_once(self) -> None:
        if hasattr(self, "world"):
            self.world.check_deliveries()

    def teardown(self) -> None:
        if hasattr(self, "world"):
            self.world.settle()
            for link in self.world.links:
                event(f"machine opens per client: {min(len(link.opened), 5)}")


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(max_examples=100, stateful_step_count=30, **COMMON)
# A failing run shrinks for up to Hypothesis' own 5 minutes; don't let pytest-timeout (300 s)
# cut that short and turn a real failure into a FlakyFailure.
TestClientMachine.pytestmark = [pytest.mark.timeout(900)]
