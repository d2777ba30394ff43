"""A stateful model of the byte-level ``TankServer``, driven through ``tank_core.testing.Harness``.

Every rule is something a peer, the application or time does. After each one the model and the
server must agree on who is open, closing or gone, who is subscribed to what, what every peer has
read, which deadlines are registered and when the next one is. ``L`` is a connection's last sign
of life (any byte it sent while known to the engine, or its opening), ``T`` the
heartbeat_timeout, ``I`` the interval, ``stall = min(1, I / 2)``, ``w = engine.ping_window``
and ``EPS = 1e-6`` s (slack only where the model adds float durations in another order than the
engine). The bounds asserted:

* Silence, lower bound: ``HeartbeatTimedOut`` only at a tick with ``now >= L + T`` (the sum the
  deadline is registered with) and ``now - L >= T - EPS``; it reports ``silent_for == now - L``.
* Stall grace: a connection closed for silence at a tick more than ``stall`` past its registered
  deadline must have been granted a grace for this same silence (same ``L``) by an earlier tick:
  the first late tick of each silence grants one.
* Silence, upper bound: after any step, an open connection with ``now >= L + T`` must be in its
  one grace: the first tick ``g`` with ``g >= L + T`` was late (``g - next_deadline()`` just
  before it ``> stall``) and ``now < g + stall``. With ticks on time: never silent for ``T``.
* Pings: the k-th Ping goes no earlier than ``opened + k * I - w``; a tick at ``now`` pings every
  open connection whose last Ping (or opening) is ``I`` or more ago, so after every step
  ``now - last_ping < I``.
* Time: ``next_deadline()`` is None or ``> now`` after every step (the clock only moves in
  tick steps); it equals a naive minimum over ``engine.scheduled_deadlines()``, the model's
  HTTP request deadlines and lingering closed sockets; the scheduled keys are exactly the
  connections open or closing; an open connection's registered deadline is ``<=``
  ``engine.due_time(conn)`` and ``<= min(last_ping + I (+ w after the first Ping), L + T)``
  (or the grace's end); a closing one's is exactly ``closed_at + close_timeout`` and it is
  aborted at the first tick at or after it.
* Topics: ``engine.check_registry()`` holds, subscribers and counts equal the model's, nothing
  is left once nobody is open.
* Delivery: what each step queues is exactly what the model predicts (fan-out recipients, text
  heartbeats to the pinged connections, Hello, the shutdown text, Close frames with the right
  code); every peer's messages are a prefix of its expected sequence, and all of it once the
  peer has read everything and nothing was discarded (slow consumer, heartbeat timeout, abort).
* Slow consumers: closed exactly when unsent bytes + the new frame would pass
  ``max_outbox_bytes``; the engine's outbox always equals the bytes queued on the data lane.
* Wire: no data frame follows a Close on any connection; Close codes are the expected ones.
* Determinism: every example's inputs are recorded and replayed on a second ``Harness`` with the
  same seed; every call's result and the whole action log must be equal.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from wsproto.connection import ConnectionState as WsState

from tank_core import LocalProtocolError, ServerConfig
from tank_core.actions import AbortTransport, Action
from tank_core.notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
    HttpRequestAnswered,
    MessageReceived,
    SlowConsumerClosed,
    TopicSubscribed,
    TopicUnsubscribed,
)
from tank_core.server.engine import ConnectionState
from tank_core.testing import (
    CloseAsked,
    Discarded,
    FakeClock,
    FakePeer,
    FakeTransport,
    Harness,
    Queued,
)

ACTION_TYPES = get_args(Action)
MAX_OUTBOX = 4096
REQUEST_TIMEOUT = 2.0
SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
HELLO_SUFFIX = "! Welcome to WebSocket server."
SHUTDOWN_TEXT = "Server is shutting down"
HEARTBEAT_FRAME_LEN = 2 + len("heartbeat")
#: Slack for sums of float durations computed in a different order than the engine's (1 µs).
EPS = 1e-6

TOPICS = ("", "a", "a:b", "news", "ü", "日本語", "sub:x", " ")
USERS = (None, "", "alice", "bob", "ü ser", "a&b=c")
#: Application messages a client may send (case 4 of PROTOCOL.md): all relayed verbatim.
RELAY_TEXTS = (
    '{"topic":"a","data":"x"}',
    "heartbeat",
    "hello",
    "Sub:a",
    " sub:a",
    "unsub",
    '{"type":"Heartbeat"}',
    '{"type":"heartbeat"',
    '["type","heartbeat"]',
    "ü€ 日本",
    "x" * 300,
)
#: Case 1: JSON objects whose "type" is "heartbeat": proof of life, never relayed.
CLIENT_HEARTBEATS = (
    '{"type":"heartbeat"}',
    ' {"type":"heartbeat","x":1}',
    '{"x":[1],"type":"heartbeat"}',
    '{"typ\\u0065":"heartbeat"}',
)
DATA = st.one_of(
    st.sampled_from(["", "hi <b>&amp;", "ü", '"quoted" \\ back']),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=10),
)
CLOSE_ARGS = st.sampled_from(
    [(1000, ""), (1001, "bye"), (1008, "policy"), (3000, "ü" * 40), (4999, "x" * 123)]
)
BAD_CLOSE_ARGS = st.sampled_from([(1005, ""), (1006, ""), (1015, ""), (999, ""), (5000, ""),
                                  (1000, "x" * 124)])


def frame_len(payload_len: int) -> int:
    if payload_len < 126:
        return 2 + payload_len
    if payload_len < 65536:
        return 4 + payload_len
    return 10 + payload_len


def render(topic: str, data: str) -> str:
    """PROTOCOL.md: compact JSON, ``topic`` first, ``<``, ``>``, ``&`` escaped as Go does."""
    text = json.dumps({"topic": topic, "data": data}, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Complete server frames in ``data``: final, unextended, unmasked (RFC 6455 §5.1)."""
    frames: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        assert len(data) - i >= 2, "truncated frame"
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0xF0 == 0x80, f"server frame not final or has RSV bits: {b0:#x}"
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        j = i + 2
        if n == 126:
            n = int.from_bytes(data[j : j + 2], "big")
            j += 2
        elif n == 127:
            n = int.from_bytes(data[j : j + 8], "big")
            j += 8
        assert j + n <= len(data), "truncated frame"
        frames.append((b0 & 0x0F, data[j : j + n]))
        i = j + n
    return frames


def close_body(payload: bytes) -> tuple[int | None, str]:
    if not payload:
        return None, ""
    assert len(payload) >= 2
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")


# ---------------------------------------------------------------------------- recording


_RECORDED = frozenset({
    "accept", "receive", "tick", "publish", "broadcast", "send", "send_to_user", "close",
    "disconnect_user", "shutdown", "data_to_send",
})


class _RecordingServer:
    """Forwards to a TankServer, recording every input call and its result (or exception)."""

    def __init__(self, server: Any, trace: list[tuple[Any, ...]], ticks: list[tuple[float, Any]]):
        self._server = server
        self._trace = trace
        self._ticks = ticks

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._server, name)
        if name not in _RECORDED:
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if name == "tick":
                now = kwargs["now"] if "now" in kwargs else args[0]
                self._ticks.append((now, self._server.next_deadline()))
            try:
                result = attr(*args, **kwargs)
            except Exception as exc:
                self._trace.append((name, args, kwargs, type(exc)))
                raise
            self._trace.append((name, args, kwargs, result))
            return result

        return recorded


class RecordingHarness(Harness):
    """A Harness whose server calls are recorded, and which notes each connection's last byte."""

    def __init__(self, config: ServerConfig, *, start: float, seed: int) -> None:
        super().__init__(config, clock=FakeClock(start=start), seed=seed)
        self.trace: list[tuple[Any, ...]] = []
        #: (now, next_deadline() just before) for every tick.
        self.ticks: list[tuple[float, Any]] = []
        #: conn id -> time of the last bytes received while the engine knew the connection.
        self.life: dict[int, float] = {}
        self.server = _RecordingServer(self.server, self.trace, self.ticks)  # type: ignore[assignment]

    def feed(self, conn_id: int, data: bytes) -> list[Action]:
        if data and self.server.engine.state_of(conn_id) is not None:
            self.life[conn_id] = self.clock.now
        return super().feed(conn_id, data)


def replay(config: ServerConfig, start: float, seed: int, trace: list[tuple[Any, ...]]) -> Harness:
    """Feed the recorded inputs to a fresh Harness; every result must be the same."""
    h2 = Harness(config, clock=FakeClock(start=start), seed=seed)
    for index, (name, args, kwargs, result) in enumerate(trace):
        method = getattr(h2.server, name)
        if isinstance(result, type) and issubclass(result, BaseException):
            with pytest.raises(result):
                method(*args, **kwargs)
            continue
        got = method(*args, **kwargs)
        assert got == result, f"call {index} ({name}) differs on replay"
        if name == "accept":
            h2.transports[got] = FakeTransport(got, h2.server)
        elif isinstance(got, list):
            h2.apply(got)
        elif isinstance(got, tuple):
            h2.apply(got[1])
    return h2


# ---------------------------------------------------------------------------- model


@dataclass
class Conn:
    cid: int
    peer: FakePeer
    user_id: str
    opened: float
    state: str = "open"  # open | closing | gone
    subs: set[str] = field(default_factory=set)
    expected: list[str | bytes] = field(default_factory=list)
    expected_pongs: list[bytes] = field(default_factory=list)
    ping_times: list[float] = field(default_factory=list)
    reading: bool = True
    discarded: bool = False
    vanished: bool = False
    closing_since: float | None = None
    #: The Close the server sent: (code or None for an empty body, reason).
    close_frame: tuple[int | None, str] | None = None
    #: What ClientDisconnected must say when the connection ends after our Close.
    disconnect: tuple[int, str] | None = None
    wire_pos: int = -1
    wire_closed: bool = False
    #: The last sign of life of the silence a tick let live past the timeout (its stall grace).
    grace_for: float | None = None


@dataclass
class Step:
    texts: dict[int, list[str]] = field(default_factory=dict)
    frame_len: int = 0
    closes: dict[int, tuple[int | None, str, bool]] = field(default_factory=dict)
    notes: list[Any] = field(default_factory=list)
    tick: bool = False
    pong: tuple[int, bytes] | None = None
    peer_close: tuple[int, int | None, str] | None = None
    vanish: tuple[int, str | None] | None = None
    shutdown: bool = False
    http: bool = False
    #: The connection opened by this step (its 101 answer is on the control lane).
    connect: int | None = None
    #: For a tick: each connection's registered deadline just before it.
    scheduled_before: dict[int, float] = field(default_factory=dict)


class TankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h: RecordingHarness | None = None
        self.conns: dict[int, Conn] = {}
        self.raws: dict[int, float] = {}
        self.lingering: dict[int, float] = {}
        self.pending_before: dict[int, int] = {}
        self._output_pos = 0
        self.counter = 0
        self.timeouts = 0
        self.slow_closes = 0
        self.dropped = 0
        self.shut = False

    # ------------------------------------------------------------------ setup

    @initialize(
        text_heartbeat=st.booleans(),
        relay=st.booleans(),
        timing=st.sampled_from([(1.0, 3.0, 1.0), (0.5, 2.5, 0.5), (1.0, 1.5, 0.25),
                                (0.7, 2.7, 0.3)]),
        start=st.one_of(st.integers(70_000, 120_000).map(float), st.floats(1e4, 1e6)),
        seed=st.integers(0, 2**16),
        users=st.lists(st.sampled_from(USERS), min_size=1, max_size=3),
    )
    def setup(self, text_heartbeat: bool, relay: bool, timing: tuple[float, float, float],
              start: float, seed: int, users: list[str | None]) -> None:
        interval, timeout, close_timeout = timing
        self.config = ServerConfig(
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
            close_timeout=close_timeout,
            max_outbox_bytes=MAX_OUTBOX,
            max_message_size=MAX_OUTBOX // 2,
            request_timeout=REQUEST_TIMEOUT,
            text_heartbeat=text_heartbeat,
            relay=relay,
        )
        self.interval, self.timeout, self.close_timeout = interval, timeout, close_timeout
        self.stall = min(1.0, interval / 2)
        self.start, self.seed = float(start), seed
        self.h = RecordingHarness(self.config, start=self.start, seed=seed)
        #: Pings due this soon are sent by the tick at hand (engine.py: shared wake-ups).
        self.window = self.h.server.engine.ping_window
        assert 0 <= self.window <= interval / 20
        for user in users:
            self.connect(user)

    def teardown(self) -> None:
        if self.h is None:
            return
        h2 = replay(self.config, self.start, self.seed, self.h.trace)
        assert h2.log == self.h.log, "the same inputs gave different actions"

    # ------------------------------------------------------------------ helpers

    @property
    def harness(self) -> RecordingHarness:
        assert self.h is not None
        return self.h

    def _open_ids(self) -> list[int]:
        return [c for c, m in self.conns.items() if m.state == "open"]

    def _pick(self, i: int, *, sendable: bool = False, closable: bool = False) -> Conn | None:
        out = []
        for m in self.conns.values():
            if m.vanished or m.peer.transport.state != "open":
                continue
            ws_state = m.peer.ws.state
            if sendable and ws_state is not WsState.OPEN:
                continue
            if closable and ws_state not in (WsState.OPEN, WsState.REMOTE_CLOSING):
                continue
            out.append(m)
        return out[i % len(out)] if out else None

    def _has_peer(self) -> bool:
        return self.h is not None and any(
            not m.vanished and m.peer.transport.state == "open" for m in self.conns.values()
        )

    def _life(self, m: Conn) -> float:
        return self.harness.life.get(m.cid, m.opened)

    def _text(self, big: bool = False) -> str:
        self.counter += 1
        return f"srv-{self.counter}" + ("B" * 2500 if big else "")

    def _begin(self) -> int:
        h = self.harness
        self.pending_before = {
            c: sum(map(len, t.data)) for c, t in h.transports.items()
        }
        self._output_pos = len(h.output_log)
        return len(h.log)

    def _wall(self) -> float:
        return self.harness.clock.wall_time

    # ------------------------------------------------------------------ settling a step

    def _settle(self, pos: int, step: Step) -> list[Any]:
        h = self.harness
        now = h.now
        new = h.log[pos:]
        texts: dict[int, list[str]] = defaultdict(list)
        closes: dict[int, list[tuple[int | None, str]]] = defaultdict(list)
        pings: dict[int, list[bytes]] = defaultdict(list)
        pongs: dict[int, list[bytes]] = defaultdict(list)
        discards: set[int] = set()
        close_tr: set[int] = set()
        aborts: set[int] = set()
        slow: dict[int, SlowConsumerClosed] = {}
        timeouts: dict[int, HeartbeatTimedOut] = {}
        gone: dict[int, ClientDisconnected] = {}
        errors: list[tuple[int, int | None, str]] = []
        notes: list[Any] = []

        def data_frames(conn_ids: tuple[int, ...], data: bytes) -> None:
            for c in conn_ids:
                assert c in self.conns, f"data frames for a non-WebSocket connection {c}"
            for op, payload in server_frames(data):
                for c in conn_ids:
                    if op == 1:
                        texts[c].append(payload.decode("utf-8"))
                    elif op == 8:
                        closes[c].append(close_body(payload))
                    else:
                        raise AssertionError(f"unexpected data-lane opcode {op}")

        for record in h.output_log[self._output_pos :]:
            match record:
                case Queued(conn_ids=cs, data=d, control=False):
                    assert len(set(cs)) == len(cs), "a fan-out names a connection twice"
                    data_frames(cs, d)
                case Queued(conn_ids=(c,), data=d, control=True):
                    if d.startswith(b"HTTP/1.1 "):
                        assert c not in self.conns or c == step.connect, f"HTTP bytes to {c}"
                        continue
                    for op, payload in server_frames(d):
                        assert op in (9, 10), op
                        (pings if op == 9 else pongs)[c].append(payload)
                case Discarded(conn_id=c):
                    discards.add(c)
                case CloseAsked(conn_id=c):
                    close_tr.add(c)
                case _:
                    raise AssertionError(f"unexpected output record {record!r}")
        for action in new:
            assert isinstance(action, ACTION_TYPES), action
            match action:
                case AbortTransport(conn_id=c):
                    aborts.add(c)
                case SlowConsumerClosed(conn_id=c):
                    assert c not in slow
                    slow[c] = action
                case HeartbeatTimedOut(conn_id=c):
                    assert c not in timeouts
                    timeouts[c] = action
                case ClientDisconnected(conn_id=c):
                    assert c not in gone, f"two ClientDisconnected for {c}"
                    gone[c] = action
                case ErrorOccurred(code=code, conn_id=c, message=message):
                    errors.append((int(code), c, message))
                case ClientConnected() | TopicSubscribed() | TopicUnsubscribed() | MessageReceived():
                    notes.append(action)
                case HttpRequestAnswered(status=status):
                    assert 200 <= status <= 599
                case _:
                    raise AssertionError(f"unexpected action {action!r}")

        assert notes == step.notes
        before_open = {c for c, m in self.conns.items() if m.state == "open"}
        cfg = self.config

        # Heartbeat timeouts: only on ticks, never before heartbeat_timeout of silence.
        assert step.tick or not timeouts
        for c, n in timeouts.items():
            assert c in before_open
            life = self._life(self.conns[c])
            assert now >= life + self.timeout and now - life >= self.timeout - EPS, (
                f"connection {c} closed for silence after {now - life} s < {self.timeout} s"
            )
            assert n.silent_for == now - life
            late = now - step.scheduled_before[c]
            assert self.conns[c].grace_for == life or late <= self.stall, (
                f"{c} closed for silence at a tick {late} s late without the stall grace"
            )

        if step.tick:
            for c in before_open - set(timeouts) - set(slow):
                m = self.conns[c]
                if step.scheduled_before[c] <= now and now >= self._life(m) + self.timeout:
                    m.grace_for = self._life(m)

        # Pings: only on ticks, one per connection, never early, never skipped.
        assert step.tick or not pings
        if step.tick:
            for c in before_open - set(timeouts):
                m = self.conns[c]
                last = m.ping_times[-1] if m.ping_times else m.opened
                assert now < last + self.interval + EPS or c in pings, (
                    f"tick at {now} did not ping {c}"
                )
        for c, payloads in pings.items():
            assert c in before_open and c not in timeouts, c
            assert len(payloads) == 1 and len(payloads[0]) == 8
            m = self.conns[c]
            m.ping_times.append(now)
            k = len(m.ping_times)
            assert now >= m.opened + k * self.interval - self.window - EPS, (
                f"ping {k} of {c} too early"
            )

        # Pongs answer the peer's Ping on an open connection.
        want_pongs: dict[int, list[bytes]] = {}
        if step.pong is not None and step.pong[0] in before_open:
            want_pongs[step.pong[0]] = [step.pong[1]]
        assert dict(pongs) == want_pongs
        for c, p in want_pongs.items():
            self.conns[c].expected_pongs += p

        # Data messages: exactly the predicted ones; slow consumers exactly when they overflow.
        predicted: dict[int, list[str]] = {c: list(v) for c, v in step.texts.items()}
        flen: dict[int, int] = dict.fromkeys(step.texts, step.frame_len)
        if step.tick and cfg.text_heartbeat:
            for c in pings:
                predicted.setdefault(c, []).append("heartbeat")
                flen[c] = HEARTBEAT_FRAME_LEN
        for c, n in slow.items():
            assert c in predicted and c in before_open, f"{c} closed as slow consumer unprompted"
            assert n.outbox_bytes == self.pending_before[c]
            assert n.outbox_bytes + flen[c] > MAX_OUTBOX, "closed a consumer that was keeping up"
        if not step.shutdown:  # the shutdown text is sent whatever the backlog
            for c in set(predicted) - set(slow):
                assert self.pending_before.get(c, 0) + flen[c] <= MAX_OUTBOX, (
                    f"{c} got a frame past max_outbox_bytes"
                )
        for c in set(predicted) | set(texts):
            want = [] if c in slow else predicted.get(c, [])
            assert texts.get(c, []) == want, (c, texts.get(c), want)
            self.conns[c].expected.extend(want)

        # Close frames and discards.
        want_close = dict(step.closes)
        for c in slow:
            want_close[c] = (1008, "slow consumer", True)
        for c in timeouts:
            want_close[c] = (1011, "heartbeat timeout", True)
        assert {c: v for c, v in closes.items()} == {
            c: [(code, reason)] for c, (code, reason, _) in want_close.items()
        }
        assert discards == {c for c, (_, _, d) in want_close.items() if d}

        # Connections that end in this step, and sockets closed or aborted.
        want_gone: dict[int, tuple[int, str]] = {}
        want_ctr: set[int] = set()
        want_abort: set[int] = set()
        want_errors = [(int(ErrorCode.HEARTBEAT_FAILED), c, None) for c in timeouts]
        if step.peer_close is not None:
            c, code, reason = step.peer_close
            m = self.conns[c]
            if m.state == "open":
                want_gone[c] = (1005 if code is None else code, reason)
                want_ctr.add(c)
            elif m.state == "closing":
                assert m.disconnect is not None
                want_gone[c] = m.disconnect
                want_ctr.add(c)
        if step.vanish is not None:
            c, error = step.vanish
            m = self.conns[c]
            if m.state == "open":
                want_gone[c] = (1006, error or "connection lost")
                if error is not None:
                    want_errors.append((int(ErrorCode.READ_ERROR), c, error))
            elif m.state == "closing":
                assert m.disconnect is not None
                want_gone[c] = m.disconnect
        if step.tick:
            for c, m in self.conns.items():
                if m.state == "closing":
                    assert m.closing_since is not None and m.disconnect is not None
                    if now >= m.closing_since + self.close_timeout:
                        want_gone[c] = m.disconnect
                        want_abort.add(c)
            for c, since in self.lingering.items():
                if now >= since + self.close_timeout:
                    want_abort.add(c)
            for c, accepted in self.raws.items():
                if now >= accepted + REQUEST_TIMEOUT:
                    want_ctr.add(c)
        if step.shutdown:
            want_ctr |= set(self.raws)
        assert {c: (g.code, g.reason) for c, g in gone.items()} == want_gone
        extra_ctr = close_tr - want_ctr
        assert step.http or not extra_ctr, f"unexpected CloseTransport {extra_ctr}"
        assert all(c not in self.conns and c not in self.raws for c in extra_ctr)
        assert want_ctr <= close_tr
        assert aborts == want_abort, (aborts, want_abort)
        got_errors = [(code, c, msg if code == ErrorCode.READ_ERROR else None)
                      for code, c, msg in errors]
        assert sorted(got_errors, key=repr) == sorted(want_errors, key=repr)

        # Apply the transitions to the model.
        for c, (code, reason, discard) in want_close.items():
            m = self.conns[c]
            assert m.state == "open", (c, m.state)
            m.state = "closing"
            m.subs.clear()
            m.closing_since = now
            m.close_frame = (code, reason)
            m.disconnect = (1005 if code is None else code, reason)
            m.discarded |= discard
        self.timeouts += len(timeouts)
        self.slow_closes += len(slow)
        for c in gone:
            m = self.conns[c]
            m.state = "gone"
            m.subs.clear()
        for c in aborts:
            if c in self.conns:
                self.conns[c].discarded = True
        for c in close_tr | aborts:
            self.raws.pop(c, None)
        for c in close_tr:
            if h.transports[c].state == "closing":
                self.lingering[c] = now
        for c in list(self.lingering):
            if h.transports[c].state != "closing":
                del self.lingering[c]
        if step.tick:
            deadline = h.server.next_deadline()
            assert deadline is None or deadline > now, "after tick(now), next_deadline() <= now"
        return new

    # ------------------------------------------------------------------ peers come and go

    @precondition(lambda self: self.h is not None and len(self.conns) < 8)
    @rule(user=st.sampled_from(USERS))
    def connect(self, user: str | None) -> None:
        h = self.harness
        pos = self._begin()
        peer = h.connect(user)
        if self.shut:
            assert not peer.accepted and peer.rejected is not None
            assert peer.rejected.status_code == 503
            self._settle(pos, Step(http=True))
            return
        assert peer.accepted and len(peer.messages) == 1
        hello = peer.messages[0]
        assert isinstance(hello, str) and hello.startswith("Hello, ") and hello.endswith(HELLO_SUFFIX)
        user_id = hello[len("Hello, ") : -len(HELLO_SUFFIX)]
        if user:
            assert user_id == user
        else:
            assert user_id.startswith("client_")
            assert all(user_id != m.user_id for m in self.conns.values())
        c = peer.conn_id
        self.conns[c] = Conn(c, peer, user_id, h.now)
        note = ClientConnected(conn_id=c, user_id=user_id, peer_host="127.0.0.1",
                               wall_time=self._wall())
        self._settle(pos, Step(texts={c: [hello]}, frame_len=frame_len(len(hello.encode())),
                               notes=[note], connect=c))

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), error=st.sampled_from([None, "connection reset"]))
    def vanish(self, i: int, error: str | None) -> None:
        m = self._pick(i)
        assert m is not None
        pos = self._begin()
        m.peer.vanish(error)
        m.vanished = True
        self._settle(pos, Step(vanish=(m.cid, error)))

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), code=st.sampled_from([1000, 1001, None, 3000, 4999]),
          reason=st.sampled_from(["", "done"]))
    def peer_close(self, i: int, code: int | None, reason: str) -> None:
        m = self._pick(i, closable=True)
        if m is None:
            return
        if code is None:
            reason = ""
        pos = self._begin()
        was = m.state
        m.peer.send_close(code, reason)
        step = Step(peer_close=(m.cid, code, reason))
        if was == "open":
            step.closes[m.cid] = (code, "", False)
        self._settle(pos, step)

    # ------------------------------------------------------------------ what peers send

    def _peer_sends(self, m: Conn, payload: str | bytes, step: Step) -> None:
        pos = self._begin()
        if isinstance(payload, str):
            m.peer.send_text(payload)
        else:
            m.peer.send_binary(payload)
        self._settle(pos, step)

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), topic=st.sampled_from(TOPICS), binary=st.booleans())
    def subscribe(self, i: int, topic: str, binary: bool) -> None:
        m = self._pick(i, sendable=True)
        if m is None:
            return
        step = Step()
        if m.state == "open" and topic not in m.subs:
            m.subs.add(topic)
            step.notes.append(TopicSubscribed(conn_id=m.cid, user_id=m.user_id, topic=topic,
                                              wall_time=self._wall()))
        text = "sub:" + topic
        self._peer_sends(m, text.encode() if binary else text, step)

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), topic=st.sampled_from(TOPICS), binary=st.booleans())
    def unsubscribe(self, i: int, topic: str, binary: bool) -> None:
        m = self._pick(i, sendable=True)
        if m is None:
            return
        step = Step()
        if m.state == "open" and topic in m.subs:
            m.subs.discard(topic)
            step.notes.append(TopicUnsubscribed(conn_id=m.cid, user_id=m.user_id, topic=topic,
                                                wall_time=self._wall()))
        text = "unsub:" + topic
        self._peer_sends(m, text.encode() if binary else text, step)

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), text=st.sampled_from(RELAY_TEXTS), binary=st.booleans())
    def relay(self, i: int, text: str, binary: bool) -> None:
        m = self._pick(i, sendable=True)
        if m is None:
            return
        step = Step()
        if m.state == "open":
            step.notes.append(MessageReceived(conn_id=m.cid, user_id=m.user_id,
                                              data=text.encode(), wall_time=self._wall()))
            if self.config.relay:
                step.texts = {c: [text] for c in self._open_ids() if c != m.cid}
                step.frame_len = frame_len(len(text.encode()))
        self._peer_sends(m, text.encode() if binary else text, step)

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), text=st.sampled_from(CLIENT_HEARTBEATS))
    def client_heartbeat(self, i: int, text: str) -> None:
        m = self._pick(i, sendable=True)
        if m is not None:
            self._peer_sends(m, text, Step())

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7))
    def invalid_binary(self, i: int) -> None:
        """PROTOCOL.md [fix]: a binary message that is not UTF-8 is dropped, never relayed."""
        m = self._pick(i, sendable=True)
        if m is None:
            return
        self._peer_sends(m, b"\xff\xfe relay me", Step())
        self.dropped += 1
        assert self.harness.server.stats().messages_dropped == self.dropped

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), payload=st.binary(max_size=125))
    def client_ping(self, i: int, payload: bytes) -> None:
        m = self._pick(i, sendable=True)
        if m is None:
            return
        pos = self._begin()
        m.peer.send_ping(payload)
        self._settle(pos, Step(pong=(m.cid, payload)))

    # ------------------------------------------------------------------ how peers read

    def _read(self, m: Conn) -> None:
        if m.peer.ws.state is not WsState.OPEN:
            # A client that has sent or received a Close may not answer Pings; FakePeer would
            # try (test_fake_peer_reads_a_ping_after_sending_close), so we do it for it.
            m.peer.auto_pong = False
        pos = self._begin()
        m.peer.read()
        self._settle(pos, Step())

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7))
    def read_one(self, i: int) -> None:
        m = self._pick(i)
        if m is not None:
            self._read(m)

    @precondition(lambda self: self.h is not None)
    @rule()
    def read_all(self) -> None:
        for m in list(self.conns.values()):
            if m.reading and not m.vanished and m.peer.transport.state in ("open", "closing"):
                self._read(m)

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), reading=st.booleans(), auto_pong=st.booleans())
    def set_habits(self, i: int, reading: bool, auto_pong: bool) -> None:
        m = self._pick(i)
        if m is not None:
            m.reading = reading
            m.peer.auto_pong = auto_pong

    # ------------------------------------------------------------------ HTTP sockets

    @precondition(lambda self: self.h is not None and len(self.raws) < 3)
    @rule()
    def raw_partial_request(self) -> None:
        """A client that opens a socket and sends half a request (slowloris)."""
        h = self.harness
        pos = self._begin()
        c = h.accept()
        self.raws[c] = h.now
        h.feed(c, b"GET /ws HTTP/1.1\r\nHost: tank.test\r\n")
        self._settle(pos, Step())

    @precondition(lambda self: bool(self.raws))
    @rule(i=st.integers(0, 3))
    def raw_more_headers(self, i: int) -> None:
        """More header bytes do not extend request_timeout."""
        h = self.harness
        c = sorted(self.raws)[i % len(self.raws)]
        pos = self._begin()
        h.feed(c, b"X-Slow: 1\r\n")
        self._settle(pos, Step())

    @precondition(lambda self: self.h is not None)
    @rule(topic=st.sampled_from(TOPICS), data=DATA)
    def api_publish(self, topic: str, data: str) -> None:
        h = self.harness
        text = render(topic, data)
        targets = [c for c in self._open_ids() if topic in self.conns[c].subs]
        pos = self._begin()
        body = json.dumps({"topic": topic, "data": data}).encode()
        answer = h.http("POST", "/api/publish", body=body)
        assert answer.status == 200
        step = Step(texts={c: [text] for c in targets}, frame_len=frame_len(len(text.encode())),
                    http=True)
        self._settle(pos, step)
        delivered = json.loads(answer.body)["delivered"]
        assert delivered == len([c for c in targets if self.conns[c].state == "open"])

    @precondition(lambda self: self.h is not None)
    @rule()
    def api_stats(self) -> None:
        h = self.harness
        pos = self._begin()
        answer = h.http("GET", "/api/stats")
        self._settle(pos, Step(http=True))
        assert answer.status == 200
        stats = json.loads(answer.body)
        assert stats["connections"] == len(self._open_ids())
        assert stats["topics"] == self._topic_counts()
        assert stats["heartbeat_timeouts"] == self.timeouts
        assert stats["slow_consumer_closes"] == self.slow_closes
        assert stats["pings_sent"] == sum(len(m.ping_times) for m in self.conns.values())

    # ------------------------------------------------------------------ the application

    def _fan_out(self, call: Any, text: str, targets: list[int], *, closes: Any = None) -> Any:
        pos = self._begin()
        result = call()
        actions = result[1] if isinstance(result, tuple) else result
        self.harness.apply(actions)
        step = Step(texts={c: [text] for c in targets}, frame_len=frame_len(len(text.encode())))
        self._settle(pos, step)
        return result

    @precondition(lambda self: self.h is not None)
    @rule(topic=st.sampled_from(TOPICS), data=DATA)
    def publish(self, topic: str, data: str) -> None:
        h = self.harness
        text = render(topic, data)
        assert json.loads(text) == {"topic": topic, "data": data}
        targets = [c for c in self._open_ids() if topic in self.conns[c].subs]
        n, _ = self._fan_out(
            lambda: h.server.publish(topic, data, now=h.now, wall_time=self._wall()),
            text, targets)
        assert n == len([c for c in targets if self.conns[c].state == "open"])

    @precondition(lambda self: self.h is not None)
    @rule(i=st.integers(-1, 7), big=st.booleans())
    def broadcast(self, i: int, big: bool) -> None:
        h = self.harness
        text = self._text(big)
        opened = self._open_ids()
        exclude = opened[i % len(opened)] if opened and i >= 0 else None
        targets = [c for c in opened if c != exclude]
        n, _ = self._fan_out(
            lambda: h.server.broadcast(text, exclude=exclude, now=h.now, wall_time=self._wall()),
            text, targets)
        assert n == len([c for c in targets if self.conns[c].state == "open"])

    @precondition(lambda self: self.h is not None)
    @rule(user=st.sampled_from(USERS[2:]), big=st.booleans())
    def send_to_user(self, user: str, big: bool) -> None:
        h = self.harness
        text = self._text(big)
        targets = [c for c in self._open_ids() if self.conns[c].user_id == user]
        n, _ = self._fan_out(
            lambda: h.server.send_to_user(user, text, now=h.now, wall_time=self._wall()),
            text, targets)
        assert n == len([c for c in targets if self.conns[c].state == "open"])

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), big=st.booleans())
    def send_one(self, i: int, big: bool) -> None:
        h = self.harness
        m = self._pick(i)
        if m is None:
            return
        text = self._text(big)
        if m.state != "open":
            with pytest.raises(LocalProtocolError):
                h.server.send(m.cid, text, now=h.now, wall_time=self._wall())
            return
        self._fan_out(lambda: h.server.send(m.cid, text, now=h.now, wall_time=self._wall()),
                      text, [m.cid])

    @precondition(lambda self: self._has_peer())
    @rule(i=st.integers(0, 7), args=CLOSE_ARGS, bad=st.one_of(st.none(), BAD_CLOSE_ARGS))
    def server_close(self, i: int, args: tuple[int, str], bad: tuple[int, str] | None) -> None:
        h = self.harness
        m = self._pick(i)
        if m is None:
            return
        code, reason = args
        if bad is not None or m.state != "open":
            code, reason = bad or args
            with pytest.raises(LocalProtocolError):
                h.server.close(m.cid, code, reason, now=h.now, wall_time=self._wall())
            return
        pos = self._begin()
        h.apply(h.server.close(m.cid, code, reason, now=h.now, wall_time=self._wall()))
        self._settle(pos, Step(closes={m.cid: (code, reason, False)}))

    @precondition(lambda self: self.h is not None)
    @rule(user=st.sampled_from(USERS[2:]))
    def disconnect_user(self, user: str) -> None:
        h = self.harness
        targets = [c for c in self._open_ids() if self.conns[c].user_id == user]
        pos = self._begin()
        n, actions = h.server.disconnect_user(user, now=h.now, wall_time=self._wall())
        h.apply(actions)
        assert n == len(targets)
        self._settle(pos, Step(closes=dict.fromkeys(targets, (1000, "", False))))

    @precondition(lambda self: self.h is not None and not self.shut)
    @rule(now=st.integers(0, 3))
    def shutdown(self, now: int) -> None:
        if now:  # three draws in four do nothing: shutdown ends the interesting part of a run
            return
        h = self.harness
        targets = self._open_ids()
        pos = self._begin()
        h.apply(h.server.shutdown(now=h.now, wall_time=self._wall()))
        self.shut = True
        self._settle(pos, Step(
            texts={c: [SHUTDOWN_TEXT] for c in targets},
            frame_len=frame_len(len(SHUTDOWN_TEXT)),
            closes=dict.fromkeys(targets, (1001, "server shutdown", False)),
            shutdown=True,
        ))
        assert h.server.shutting_down

    # ------------------------------------------------------------------ time

    def _tick(self) -> None:
        h = self.harness
        before = h.server.engine.scheduled_deadlines()
        pos = self._begin()
        h.tick()
        self._settle(pos, Step(tick=True, scheduled_before=before))

    @precondition(lambda self: self.h is not None)
    @rule(dt=st.floats(0.0, 0.6))
    def tick_small(self, dt: float) -> None:
        self.harness.clock.advance(dt)
        self._tick()

    @precondition(lambda self: self.h is not None)
    @rule(dt=st.floats(1.0, 8.0))
    def tick_late(self, dt: float) -> None:
        """A late tick: a blocked loop or a long GC pause."""
        self.harness.clock.advance(dt)
        self._tick()

    @precondition(lambda self: self.h is not None and self.harness.server.next_deadline() is not None)
    @rule()
    def tick_at_deadline(self) -> None:
        h = self.harness
        deadline = h.server.next_deadline()
        assert deadline is not None and deadline > h.now
        h.clock.jump_to(deadline)
        self._tick()

    @precondition(lambda self: self.h is not None)
    @rule(dt=st.floats(0.0, 6.0))
    def advance_on_time(self, dt: float) -> None:
        """An adapter that wakes exactly at every deadline (bounded, never Harness.advance's
        unbounded loop)."""
        h = self.harness
        target = h.now + dt
        for _ in range(1000):
            deadline = h.server.next_deadline()
            if deadline is None or deadline > target:
                break
            assert deadline > h.now, "next_deadline() is not in the future"
            h.clock.jump_to(deadline)
            self._tick()
        else:
            raise AssertionError("more than 1000 deadlines in a few seconds")
        h.clock.jump_to(target)
        self._tick()

    @precondition(lambda self: self.h is not None)
    @rule()
    def retick(self) -> None:
        """DESIGN.md §2: tick is idempotent for the same now."""
        h = self.harness
        pos = len(h.log)
        assert h.tick() == []
        assert h.log[pos:] == []

    # ------------------------------------------------------------------ invariants

    def _topic_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for c in self._open_ids():
            for topic in self.conns[c].subs:
                counts[topic] += 1
        return dict(counts)

    @invariant()
    def states_agree(self) -> None:
        if self.h is None:
            return
        engine = self.harness.server.engine
        assert set(engine.open_connections()) == set(self._open_ids())
        tracked = {c for c, m in self.conns.items() if m.state in ("open", "closing")}
        assert set(engine.scheduled_deadlines()) == tracked
        for c, m in self.conns.items():
            want = {"open": ConnectionState.OPEN, "closing": ConnectionState.CLOSING,
                    "gone": None}[m.state]
            assert engine.state_of(c) is want, (c, m.state)
            if m.state != "gone":
                assert engine.outbox_of(c) == sum(map(len, m.peer.transport.data)), c
        users: dict[str, set[int]] = defaultdict(set)
        for c in self._open_ids():
            users[self.conns[c].user_id].add(c)
        for user in set(users) | {u for u in USERS if u}:
            assert set(engine.connections_of(user)) == users.get(user, set())
        assert self.harness.server.finished == (self.shut and not tracked)

    @invariant()
    def topics_agree(self) -> None:
        if self.h is None:
            return
        engine = self.harness.server.engine
        engine.check_registry()
        for topic in TOPICS:
            want = {c for c in self._open_ids() if topic in self.conns[c].subs}
            assert set(engine.subscribers_of(topic)) == want, topic
        for c, m in self.conns.items():
            if m.state != "gone":
                assert engine.topics_of(c) == frozenset(m.subs)
        counts = engine.stats().topics
        assert counts == self._topic_counts()
        if not self._open_ids():
            assert counts == {}, "topics outlived their last subscriber"

    @invariant()
    def deadlines_agree(self) -> None:
        if self.h is None:
            return
        h = self.harness
        now = h.now
        engine = h.server.engine
        scheduled = engine.scheduled_deadlines()
        naive = list(scheduled.values())
        naive += [accepted + REQUEST_TIMEOUT for accepted in self.raws.values()]
        naive += [since + self.close_timeout for since in self.lingering.values()]
        deadline = h.server.next_deadline()
        assert deadline == (min(naive) if naive else None)
        assert deadline is None or deadline > now
        for c, m in self.conns.items():
            if m.state == "closing":
                assert m.closing_since is not None
                assert scheduled[c] == m.closing_since + self.close_timeout
            elif m.state == "open":
                due = engine.due_time(c)
                assert scheduled[c] <= due, "a registered deadline is later than the due time"
                life = self._life(m)
                last_ping = m.ping_times[-1] if m.ping_times else m.opened
                death = life + self.timeout
                grace = self._grace_tick(m)
                if grace is not None:
                    death = max(death, grace + self.stall)
                next_ping = last_ping + self.interval + (self.window if m.ping_times else 0.0)
                assert scheduled[c] <= min(next_ping + EPS, death)
                # Pings: nobody waits an interval or more for one.
                assert now - last_ping < self.interval + EPS, f"{c} not pinged since {last_ping}"

    def _grace_tick(self, m: Conn) -> float | None:
        """The tick that found ``m`` silent for heartbeat_timeout, if it was late (its grace)."""
        life = self._life(m)
        for when, before in self.harness.ticks:
            if when >= life + self.timeout:
                late = before is not None and when - before > self.stall
                return when if late else None
        return None

    @invariant()
    def silence_bounded(self) -> None:
        if self.h is None:
            return
        now = self.harness.now
        for c in self._open_ids():
            m = self.conns[c]
            silent = now - self._life(m)
            if now >= self._life(m) + self.timeout:
                grace = self._grace_tick(m)
                assert grace is not None, f"{c} silent for {silent} s, no late tick to excuse it"
                assert now < grace + self.stall, f"{c} kept open past its stall grace"

    @invariant()
    def peers_read_what_was_sent(self) -> None:
        if self.h is None:
            return
        for c, m in self.conns.items():
            peer = m.peer
            got = peer.messages
            assert got == m.expected[: len(got)], f"{c} read {got!r}, expected {m.expected!r}"
            assert peer.pongs == m.expected_pongs[: len(peer.pongs)]
            transport = peer.transport
            clean = not (m.discarded or m.vanished) and transport.state != "aborted"
            if clean and not transport.data and not transport.control:
                assert got == m.expected, f"{c} lost messages: {got!r} vs {m.expected!r}"
                assert peer.pongs == m.expected_pongs
            if peer.close is not None:
                assert m.close_frame is not None
                code, reason = m.close_frame
                assert (int(peer.close.code), peer.close.reason or "") == (
                    1005 if code is None else code, reason)

    @invariant()
    def wire_is_well_formed(self) -> None:
        if self.h is None:
            return
        for c, m in self.conns.items():
            written = bytes(m.peer.transport.written)
            if m.wire_pos < 0:
                assert written.startswith(b"HTTP/1.1 101 ")
                m.wire_pos = written.index(b"\r\n\r\n") + 4
            frames = server_frames(written[m.wire_pos :])
            m.wire_pos = len(written)
            for op, payload in frames:
                assert op in (1, 8, 9, 10), f"opcode {op} on {c}"
                if m.wire_closed:
                    assert op not in (0, 1, 2), f"data frame after Close on {c}"
                    assert op != 8, f"second Close on {c}"
                if op == 1:
                    payload.decode("utf-8")
                elif op == 8:
                    m.wire_closed = True
                    code, reason = close_body(payload)
                    assert code is None or code in SENDABLE or 3000 <= code <= 4999
                    assert m.close_frame == (code, reason)
                    assert len(payload) <= 125


TestTankMachine = TankMachine.TestCase
TestTankMachine.settings = settings(
    # The loaded profile's count: 200 under CI=1 (tests/conftest.py), 50 otherwise.
    max_examples=settings.default.max_examples,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------- focused tests


def _tick_on_time(h: Harness, until: float) -> None:
    """Wake at every deadline up to ``until`` like an adapter, asserting each one moves on."""
    for _ in range(100):
        deadline = h.server.next_deadline()
        if deadline is None or deadline > until:
            return
        h.clock.jump_to(deadline)
        h.tick()
        after = h.server.next_deadline()
        assert after is None or after > h.now, (
            f"after tick({h.now!r}) next_deadline() is {after!r}: the adapter would spin"
        )
    raise AssertionError("tick did not make progress (Harness.advance would loop forever)")


@pytest.mark.parametrize(("start", "timeout"), [(857433.7369372327, 2.7), (247964.627, 2.3)])
def test_tick_at_death_deadline_closes_or_moves_on(start: float, timeout: float) -> None:
    """DESIGN.md §2: after tick(now), next_deadline() is None or > now.

    The death deadline is registered as ``last_seen + timeout`` but judged as
    ``now - last_seen < timeout``. When the addition rounds down, a tick exactly at the deadline
    finds the peer 'not yet silent' and re-registers the same deadline: next_deadline() == now,
    Harness.advance loops forever and an adapter spins until its clock moves.
    """
    assert (start + timeout) - start < timeout  # the rounding this case needs
    h = Harness(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=timeout),
                clock=FakeClock(start=start))
    peer = h.connect("silent")
    peer.auto_pong = False
    _tick_on_time(h, start + timeout + 0.5)
    assert not h.server.engine.is_open(peer.conn_id)
    assert any(isinstance(n, HeartbeatTimedOut) for n in h.notifications)


def test_a_stall_grants_grace_once_per_silence() -> None:
    """DESIGN.md §2 ("Our lateness is not the peer's fault"): a tick far past its deadline gives
    a silent peer a short grace before closing it with 1011."""
    h = Harness(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0),
                clock=FakeClock(start=100_000.0))
    peer = h.connect("a")
    peer.auto_pong = False
    h.clock.advance(10.0)
    h.tick()
    assert h.server.engine.is_open(peer.conn_id), "a stall closed a peer without grace"
    h.clock.advance(0.5)  # the grace (stall = min(1, interval / 2)) has passed, still silent
    h.tick()
    assert not h.server.engine.is_open(peer.conn_id)
    assert peer.read() and peer.close is not None and peer.close.code == 1011


def test_second_stall_after_peer_spoke_gets_grace_too() -> None:
    """The same rule for a second stall: the peer spoke after the first grace, then the loop
    stalls again. It must get a grace again; the core closes it at once because grace_until is
    only cleared by a tick that finds the peer heard from, and no tick ran in between."""
    h = Harness(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0),
                clock=FakeClock(start=100_000.0))
    peer = h.connect("a")
    peer.auto_pong = False
    h.clock.advance(10.0)
    h.tick()  # first stall: grace
    assert h.server.engine.is_open(peer.conn_id)
    peer.send_text('{"type":"heartbeat"}')  # proof of life during the grace
    h.clock.advance(10.0)
    h.tick()  # second stall, the peer silent since its heartbeat 10 s ago
    assert h.server.engine.is_open(peer.conn_id), (
        "closed with 1011 at a stalled tick without the grace a first stall gets"
    )


def test_fake_peer_reads_a_ping_after_sending_close() -> None:
    """tank_core.testing.FakePeer: a Ping already queued when the peer sends its Close must not
    make read() raise (a client that has sent a Close cannot answer it; wsproto refuses)."""
    h = Harness(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0),
                clock=FakeClock(start=100_000.0))
    peer = h.connect("a")
    h.clock.advance(1.0)
    h.tick()  # a Ping is queued for the peer
    peer.send_close(1000)
    peer.read()
    assert peer.pings and peer.close is not None and peer.close.code == 1000


def _scripted(h: RecordingHarness) -> None:
    a, b = h.connect("alice"), h.connect()
    a.send_text("sub:news")
    b.send_text("sub:news")
    h.apply(h.server.publish("news", "x", now=h.now, wall_time=h.clock.wall_time)[1])
    b.send_text("relay")
    h.clock.advance(1.0)
    h.tick()
    a.read()
    b.auto_pong = False
    b.read()
    h.clock.advance(5.0)
    h.tick()
    a.send_close(1000)
    a.auto_pong = False  # see test_fake_peer_reads_a_ping_after_sending_close
    a.read()
    h.apply(h.server.shutdown(now=h.now, wall_time=h.clock.wall_time))


def test_replay_gives_the_same_actions() -> None:
    config = ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    h = RecordingHarness(config, start=100_000.0, seed=7)
    _scripted(h)
    assert len(h.log) + len(h.output_log) > 20 and h.trace
    h2 = replay(config, 100_000.0, 7, h.trace)
    assert h2.log == h.log
    assert h2.output_log == h.output_log
    # The check has teeth: the same inputs to a server configured otherwise (no relay) differ.
    with pytest.raises(AssertionError, match="differs on replay"):
        replay(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0, relay=False),
               100_000.0, 7, h.trace)
