"""The client holds its ground (issue 10, deliver 2), on a fake clock against a server written by hand.

* What a server can make the client queue is bounded. A server that pings and never reads gets no
  more Pongs added once ``MAX_CONTROL_BACKLOG`` bytes wait: only the latest Ping is answered (RFC
  6455 §5.5.3), our own heartbeats do not pile up behind them either, and a binary message is held
  no longer than it could be within ``max_message_size``.
* The backoff keeps growing across connections that fail soon after they open. The failure count
  ``n`` (``Reconnecting.attempt``; delay bound ``min(max, initial * 2**(n-1))``) starts again only
  after a stable connection: the server heard from ``reconnect_stable_after`` seconds after the
  open, and no 1013 "Try Again Later" at the end.

``Top`` draws every delay at its bound, so the bound itself is what the tests read.
"""

from __future__ import annotations

import random
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from tank_core import ClientConfig, ConfigError, TankClient
from tank_core.actions import AbortTransport, OpenConnection
from tank_core.client import ClientState, Closed, Opened, Reconnecting
from tank_core.client.connect import ClientConnect
from tank_core.client.machine import ClientAction
from tank_core.events import BytesReceived, ConnectionOpened, TransportClosed
from tank_core.wire.connection import MAX_CONTROL_BACKLOG

URL = "ws://127.0.0.1:8080/ws"
#: One binade (65536..131072): sums with multiples of 1/64 are exact.
START = 70000.0
#: The largest Pong a client writes: 2 header bytes, a 4-byte mask, 125 bytes of payload (§5.5).
BIGGEST_PONG = 2 + 4 + 125
#: Our own heartbeat (a masked text frame and a masked 8-byte Ping), queued at most once.
HEARTBEAT_BYTES = 2 + 4 + len('{"type":"heartbeat"}') + 2 + 4 + 8
COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


class Top(random.Random):
    """Every delay drawn at the top of its range."""

    def uniform(self, a: float, b: float) -> float:
        return b


def config(**overrides: Any) -> ClientConfig:
    values: dict[str, Any] = {"url": URL}
    values.update(overrides)
    return ClientConfig(**values)


class Driver:
    """One ``TankClient`` and the server at the far end of its connections, on a fake clock. The
    adapter's part is played by hand: output is taken only when a test says so (``take``)."""

    def __init__(self, cfg: ClientConfig, rng: random.Random | None = None) -> None:
        self.client = TankClient(cfg, rng=rng if rng is not None else Top())
        self.now = START
        self.notes: list[ClientAction] = []
        self.pending: int | None = None
        self.server = WSConnection(ConnectionType.SERVER)
        self.run(self.client.start(now=self.now))

    def run(self, actions: list[ClientAction]) -> None:
        for action in actions:
            if isinstance(action, OpenConnection):
                self.pending = action.conn_id
            elif not isinstance(action, AbortTransport):
                self.notes.append(action)

    def last(self, kind: type) -> Any:
        return next(note for note in reversed(self.notes) if isinstance(note, kind))

    def take(self) -> bytes:
        """What waits for the current connection, as the adapter would take it."""
        conn_id = self.client.conn_id
        assert conn_id is not None
        self.client.take_ready()
        return self.client.data_to_send(conn_id) or b""

    def open(self) -> None:
        """The pending attempt connects and the server accepts the upgrade."""
        conn_id, self.pending = self.pending, None
        assert conn_id is not None
        self.run(self.client.receive(ConnectionOpened(conn_id=conn_id, now=self.now, wall_time=0.0)))
        self.server = WSConnection(ConnectionType.SERVER)
        self.server.receive_data(self.take())
        assert any(isinstance(event, Request) for event in self.server.events())
        self.feed(self.server.send(AcceptConnection()))
        assert self.client.state is ClientState.OPEN

    def refuse(self) -> None:
        """The pending attempt fails (connection refused)."""
        conn_id, self.pending = self.pending, None
        assert conn_id is not None
        self.run(self.client.receive(
            TransportClosed(conn_id=conn_id, now=self.now, wall_time=0.0, error="refused")))

    def feed(self, data: bytes) -> None:
        conn_id = self.client.conn_id
        assert conn_id is not None
        self.run(self.client.receive(
            BytesReceived(conn_id=conn_id, data=data, now=self.now, wall_time=0.0)))

    def end(self, how: str) -> None:
        """The server ends the open connection: a Close with a code, or EOF."""
        if how == "eof":
            conn_id = self.client.conn_id
            assert conn_id is not None
            self.run(self.client.receive(
                TransportClosed(conn_id=conn_id, now=self.now, wall_time=0.0, error=None)))
        else:
            self.feed(self.server.send(CloseConnection(code=int(how))))
        assert self.client.state is ClientState.WAITING

    def wait(self, seconds: float) -> None:
        """Let time pass, ticking the client at each of its deadlines on the way."""
        target = self.now + seconds
        while (due := self.client.next_deadline()) is not None and due <= target:
            self.now = max(self.now, due)
            self.run(self.client.tick(self.now))
        self.now = target
        self.run(self.client.tick(self.now))

    def retry(self) -> Reconnecting:
        """Wait out the backoff delay until the next attempt starts; the delay announced."""
        note = self.last(Reconnecting)
        while self.pending is None:
            due = self.client.next_deadline()
            assert due is not None
            self.now = max(self.now, due)
            self.run(self.client.tick(self.now))
        return note


def bound(cfg: ClientConfig, n: int) -> float:
    return min(cfg.reconnect_max_delay, cfg.reconnect_initial_delay * 2 ** (n - 1))


def numbered(number: int, size: int) -> bytes:
    """A Ping payload of ``size`` bytes ending with ``number`` (its low bytes when short)."""
    tail = number.to_bytes(8, "big")
    return (bytes(max(0, size - 8)) + tail)[len(tail) + max(0, size - 8) - size :]


def pongs_and_texts(server: WSConnection, data: bytes) -> tuple[list[bytes], list[str]]:
    server.receive_data(data)
    pongs: list[bytes] = []
    texts: list[str] = []
    for event in server.events():
        if isinstance(event, Pong):
            pongs.append(bytes(event.payload))
        elif isinstance(event, TextMessage):
            texts.append(event.data)
    return pongs, texts


# =========================================================================== what a server can make us queue


@settings(max_examples=25, **COMMON)
@given(
    sizes=st.lists(st.integers(0, 125), min_size=1, max_size=8),
    per_chunk=st.integers(1, 400),
    chunks=st.integers(10, 60),
    pause=st.sampled_from([0.0, 0.25, 1.0, 4.0]),
)
def test_a_ping_flood_never_read_leaves_the_client_a_bounded_backlog(
    sizes: list[int], per_chunk: int, chunks: int, pause: float
) -> None:
    """Thousands of Pings from a server that never reads: the client's queued bytes stay under
    ``MAX_CONTROL_BACKLOG`` plus one Pong (and one heartbeat), heartbeats included, while the
    connection stays open; once read, the Pongs answer Pings in order, the latest one last."""
    drive = Driver(config(heartbeat_interval=1.0, heartbeat_timeout=5.0))
    drive.open()
    drive.take()  # the upgrade is written; from now on nothing is
    sent: list[bytes] = []
    for chunk in range(chunks):
        data = b""
        for i in range(per_chunk):
            payload = numbered(len(sent), sizes[(chunk + i) % len(sizes)])
            sent.append(payload)
            data += drive.server.send(Ping(payload=payload))
        drive.feed(data)
        drive.wait(pause)  # heartbeats fall due meanwhile
        assert drive.client.state is ClientState.OPEN
        assert drive.client.buffered < MAX_CONTROL_BACKLOG + BIGGEST_PONG + HEARTBEAT_BYTES, (
            len(sent), drive.client.buffered)
    pongs, _texts = pongs_and_texts(drive.server, drive.take())
    assert pongs and pongs[-1] == sent[-1]  # §5.5.3: the most recently processed Ping
    it = iter(sent)
    assert all(any(p == s for s in it) for p in pongs), "Pongs out of order"


@settings(max_examples=25, **COMMON)
@given(payloads=st.lists(st.binary(max_size=125), min_size=1, max_size=300),
       per_read=st.integers(1, 50))
def test_every_ping_is_answered_when_the_server_reads(payloads: list[bytes], per_read: int) -> None:
    """A server that reads its Pongs gets one per Ping, in order: the bound costs it nothing."""
    drive = Driver(config())
    drive.open()
    drive.take()
    got: list[bytes] = []
    for start in range(0, len(payloads), per_read):
        drive.feed(b"".join(drive.server.send(Ping(payload=p))
                            for p in payloads[start : start + per_read]))
        got += pongs_and_texts(drive.server, drive.take())[0]
    assert got == payloads


def test_a_server_that_pings_and_never_reads_for_hours_costs_a_bounded_amount() -> None:
    """Nothing ends the connection (the Pings are signs of life): ten thousand heartbeat
    intervals later the client still holds less than the backlog."""
    drive = Driver(config(heartbeat_interval=1.0, heartbeat_timeout=3.0))
    drive.open()
    drive.take()
    ping = drive.server.send(Ping(payload=b"x" * 125))
    highest = 0
    for _ in range(10_000):
        drive.feed(ping * 2)
        drive.wait(1.0)
        highest = max(highest, drive.client.buffered)
    assert drive.client.state is ClientState.OPEN
    assert highest < MAX_CONTROL_BACKLOG + BIGGEST_PONG + HEARTBEAT_BYTES, highest


def test_our_heartbeats_do_not_pile_up_behind_a_server_that_never_reads() -> None:
    """A server that keeps talking (its text heartbeat, no Pings) and never reads: one heartbeat
    of ours waits, not one per interval."""
    drive = Driver(config(heartbeat_interval=1.0, heartbeat_timeout=3.0))
    drive.open()
    drive.take()
    beat = drive.server.send(Message(data="heartbeat"))
    for _ in range(5000):
        drive.feed(beat)
        drive.wait(1.0)
    assert drive.client.state is ClientState.OPEN
    assert 0 < drive.client.buffered <= HEARTBEAT_BYTES, drive.client.buffered
    # Read again: heartbeats resume, one per interval.
    drive.take()
    for _ in range(3):
        drive.feed(beat)
        drive.wait(1.0)
        _pongs, texts = pongs_and_texts(drive.server, drive.take())
        assert texts == ['{"type":"heartbeat"}']


@settings(max_examples=50, **COMMON)
@given(
    limit=st.integers(1, 64),
    text=st.text(alphabet=st.sampled_from(["a", "é", "€", "𝄞"]), max_size=80),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_a_binary_message_is_held_no_longer_than_max_message_size_allows(
    limit: int, text: str, cuts: list[int]
) -> None:
    """Binary (never sent by a Tank server) is counted as it arrives: accepted when it decodes to
    ``max_message_size`` characters or fewer, else the connection ends with 1009, at the latest
    once more than 4 bytes per allowed character are held."""
    drive = Driver(config(max_message_size=limit))
    drive.open()
    raw = text.encode()
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        drive.feed(drive.server.send(BytesMessage(data=piece, message_finished=last)))
        if drive.client.state is not ClientState.OPEN:
            break
    if len(text) <= limit:
        assert drive.client.state is ClientState.OPEN
        assert drive.notes[-1].text == text  # type: ignore[union-attr]
    else:
        assert drive.last(Closed) == Closed(code=1009, reason="message too big", final=False)


def test_an_endless_binary_message_ends_the_connection_with_1009() -> None:
    drive = Driver(config(max_message_size=1000))
    drive.open()
    for _ in range(10):
        drive.feed(drive.server.send(BytesMessage(data=b"x" * 1000, message_finished=False)))
        if drive.client.state is not ClientState.OPEN:
            break
    assert drive.last(Closed) == Closed(code=1009, reason="message too big", final=False)


# =========================================================================== backoff across connections


@pytest.mark.parametrize("how", ["1000", "1001", "1011", "1013", "eof"])
def test_a_server_that_accepts_then_closes_at_once_gets_ever_longer_delays(how: str) -> None:
    """Each connection opens (101) and ends at once: every end is a failure, so the bound keeps
    doubling up to ``reconnect_max_delay`` and stays there."""
    cfg = config()
    drive = Driver(cfg)
    delays = []
    for _ in range(12):
        drive.open()
        drive.end(how)
        note = drive.retry()
        delays.append(note.delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]
    assert [o.attempt for o in drive.notes if isinstance(o, Opened)][1:] == [1] * 11


def test_a_connection_closed_sooner_than_the_stable_period_keeps_the_backoff_growing() -> None:
    """Up and heard from for a little less than ``reconnect_stable_after``: still a failure."""
    cfg = config(heartbeat=False, reconnect_stable_after=10.0)
    drive = Driver(cfg)
    for n in range(1, 8):
        drive.open()
        drive.wait(9.9)
        drive.feed(drive.server.send(Message(data="heartbeat")))
        drive.end("1000")
        assert drive.retry() == Reconnecting(delay=bound(cfg, n), attempt=n)


def test_accept_and_close_at_once_costs_a_few_attempts_a_minute_not_hundreds() -> None:
    """Issue 10 measured ~240 attempts per client per minute; with random jitter and the
    defaults, ten minutes now cost a few dozen at most."""
    for seed in range(5):
        drive = Driver(config(), rng=random.Random(seed))
        opens = 0
        while drive.now < START + 600:
            drive.open()
            opens += 1
            drive.end("1013")
            drive.retry()
        assert opens < 60, (seed, opens)


def test_a_connection_heard_from_past_the_stable_period_resets_the_backoff() -> None:
    cfg = config(heartbeat_interval=1.0, heartbeat_timeout=3.0, reconnect_stable_after=10.0)
    drive = Driver(cfg)
    for n in range(1, 6):
        drive.open()
        drive.end("1000")
        assert drive.retry().attempt == n
    for how in ("1000", "1001", "eof"):
        drive.open()
        for _ in range(11):  # the server's Pings keep coming, past the stable period
            drive.wait(1.0)
            drive.feed(drive.server.send(Ping(payload=b"")))
        drive.end(how)
        assert drive.retry() == Reconnecting(delay=cfg.reconnect_initial_delay, attempt=1)
        drive.open()  # and a quick failure after it counts from there
        drive.end("1000")
        assert drive.retry() == Reconnecting(delay=bound(cfg, 2), attempt=2)


def test_1013_try_again_later_never_resets_the_backoff() -> None:
    cfg = config(heartbeat_interval=1.0, heartbeat_timeout=3.0, reconnect_stable_after=10.0)
    drive = Driver(cfg)
    for n in range(1, 4):
        drive.open()
        drive.end("1000")
        assert drive.retry().attempt == n
    drive.open()
    for _ in range(60):  # a minute up, then the server is overloaded
        drive.wait(1.0)
        drive.feed(drive.server.send(Ping(payload=b"")))
    drive.end("1013")
    assert drive.retry() == Reconnecting(delay=bound(cfg, 4), attempt=4)


def test_silence_does_not_count_as_being_up() -> None:
    """Stable means heard from: a server that accepts then says nothing, until the heartbeat
    timeout (or, without heartbeats, until it drops the connection), is a failure."""
    cfg = config(heartbeat_interval=5.0, heartbeat_timeout=15.0, reconnect_stable_after=10.0)
    drive = Driver(cfg)
    for n in range(1, 5):
        drive.open()
        drive.wait(15.0)  # heartbeat timeout
        assert drive.client.state is ClientState.WAITING
        assert drive.retry() == Reconnecting(delay=bound(cfg, n), attempt=n)
    quiet = Driver(config(heartbeat=False, reconnect_stable_after=10.0))
    for n in range(1, 5):
        quiet.open()
        quiet.wait(3600.0)
        quiet.end("eof")
        assert quiet.retry().attempt == n


END = st.sampled_from(["1000", "1001", "1011", "1013", "eof"])


@settings(max_examples=100, **COMMON)
@given(
    stable=st.integers(1, 40).map(lambda k: k / 4),
    script=st.lists(
        st.tuples(
            st.integers(0, 3),  # refused attempts first
            st.integers(0, 60).map(lambda k: k / 4),  # then open; heard from until this long after
            st.integers(0, 20).map(lambda k: k / 4),  # then silent this long
            END,
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_the_failure_count_resets_only_after_a_stable_connection(
    stable: float, script: list[tuple[int, float, float, str]]
) -> None:
    """The model: ``n`` grows by one per failed attempt and per connection end, and starts again
    from 1 after a connection heard from ``stable`` seconds after its open (a Ping, or the Close
    that ends it) that did not end with 1013; ``Opened.attempt`` counts the attempts since the
    previous connection ended."""
    cfg = config(heartbeat=False, reconnect_initial_delay=0.25, reconnect_max_delay=8.0,
                 reconnect_stable_after=stable)
    drive = Driver(cfg)
    n = retries = 0
    for refused, heard, silent, how in script:
        for _ in range(refused):
            drive.refuse()
            n += 1
            retries += 1
            assert drive.retry() == Reconnecting(delay=bound(cfg, n), attempt=n)
        drive.open()
        assert drive.last(Opened).attempt == retries
        retries = 0
        drive.wait(heard)
        drive.feed(drive.server.send(Ping(payload=b"")))
        drive.wait(silent)
        drive.end(how)
        # The server's Close is a sign of life too; an EOF is not.
        last = heard if how == "eof" else heard + silent
        if how != "1013" and last >= stable:
            n = 0
        n += 1
        retries += 1
        assert drive.retry() == Reconnecting(delay=bound(cfg, n), attempt=n)


# =========================================================================== configuration


def test_reconnect_stable_after_defaults_to_ten_seconds_and_is_validated() -> None:
    assert ClientConfig(url=URL).reconnect_stable_after == 10.0
    assert ClientConfig(url=URL, reconnect_stable_after=0.5).reconnect_stable_after == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), "10", True, None):
        with pytest.raises(ConfigError, match="reconnect_stable_after"):
            ClientConfig(url=URL, reconnect_stable_after=bad)  # type: ignore[arg-type]


class _Connect(ClientConnect[Any], client=lambda cfg, callbacks, ssl: cfg):
    """``connect(...)`` with the client replaced by its config, to read what it builds."""

    def _session(self, client: Any) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError


def test_connect_takes_reconnect_stable_after() -> None:
    assert _Connect(URL).client.reconnect_stable_after == 10.0
    assert _Connect(URL, reconnect_stable_after=2.5).client.reconnect_stable_after == 2.5
    with pytest.raises(ConfigError, match="reconnect_stable_after"):
        _Connect(URL, reconnect_stable_after=-1)


def test_a_refused_upgrade_says_its_status() -> None:
    # tank sub gives up at once on a final answer (a 404 will not change by retrying): it needs
    # the status as data, and the reason in one documented form.
    driver = Driver(config())
    conn_id, driver.pending = driver.pending, None
    assert conn_id is not None
    driver.run(driver.client.receive(ConnectionOpened(conn_id=conn_id, now=driver.now, wall_time=0.0)))
    driver.server = WSConnection(ConnectionType.SERVER)
    driver.server.receive_data(driver.take())
    assert any(isinstance(event, Request) for event in driver.server.events())
    driver.feed(driver.server.send(RejectConnection(status_code=404)))
    closed = driver.last(Closed)
    assert (closed.code, closed.http_status) == (1006, 404)
    assert closed.reason == "upgrade refused with HTTP 404 Not Found"
