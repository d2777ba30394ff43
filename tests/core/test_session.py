"""The session rules every adapter shares (``tank_core.server.session``), on ``FakeServer``'s fake clock.

Three of these were drifts between the adapters before the rules moved into the core: a late verdict
that the core refuses, a timer that fires a hair early, and an object with an async ``__call__``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest

from tank_core import ConfigError, LocalProtocolError, ServerConfig, TankServer
from tank_core.actions import (
    AbortTransport,
    OpenConnection,
    PauseReading,
    ResumeReading,
    UpgradeRequest,
)
from tank_core.notifications import ClientConnected, MessageReceived
from tank_core.server.session import EARLY_WAKE_SLACK, ServerSession, is_async
from tank_core.testing import FakeClock, FakeServer


class TimerSession(ServerSession):
    """A session whose timer and clock the test moves by hand."""

    def __init__(self, **options: object) -> None:
        super().__init__(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0), **options)  # type: ignore[arg-type]
        self.now = 1000.0
        self.armed: list[float | None] = []
        self.executed: list[object] = []
        self.aborted = 0

    def _clock(self) -> float:
        return self.now

    def _wall(self) -> float:
        return 1.7e9

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        self.executed.append(action)

    def _output_ready(self) -> None:
        self.core.take_ready()

    def _turn_wanted(self) -> None:
        self._end_turn()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        raise AssertionError("nothing to spawn here")

    def _hooks_waiting(self) -> None:
        pass

    def _arm(self, deadline: float | None) -> None:
        self.armed.append(deadline)

    def _abort_all(self) -> None:
        self.aborted += 1


def upgrade(server: FakeServer, user: str = "u") -> int:
    """An upgrade request on a fresh socket; returns its id (waiting for the verdict)."""
    conn = server.harness.accept()
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    request = (
        f"GET /ws?user_id={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    server.harness.feed(conn, request.encode())
    return conn


# --------------------------------------------------------------------------- drift 1: verdicts


def test_a_verdict_the_core_refuses_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FakeServer(authenticate=lambda request: True)
    peer = server.connect("a")
    with caplog.at_level(logging.WARNING, logger="tank"):
        server._verdict(peer.conn_id, (True, 0, ""))  # late: that connection is open already
    assert server.failure is None
    assert "too late" in caplog.text
    assert server.publish("t", "x") == 0  # still usable


def test_a_verdict_after_its_connection_went_is_ignored() -> None:
    server = FakeServer(authenticate=lambda request: None)
    conn = upgrade(server)
    server.harness.peer_closed(conn)
    server._verdict(conn, (True, 0, ""))
    assert server.failure is None and server.core.connection_ids() == ()


def test_an_async_authenticate_answers_later_and_an_exception_refuses() -> None:
    async def allow(request: UpgradeRequest) -> bool:
        return request.user_id == "ok"

    server = FakeServer(authenticate=allow)
    assert server.connect("ok").ws.state.name == "OPEN"
    conn = upgrade(server, "no")
    assert server.harness.flush(conn).startswith(b"HTTP/1.1 401")

    def broken(request: UpgradeRequest) -> bool:
        raise RuntimeError("database down")

    server = FakeServer(authenticate=broken)
    conn = upgrade(server)
    assert server.harness.flush(conn).startswith(b"HTTP/1.1 401")
    assert server.failure is None


# --------------------------------------------------------------------------- drift 2: the timer


def test_a_timer_a_hair_early_ticks_at_its_deadline() -> None:
    session = TimerSession()
    session._start_core()
    conn = session._accept("127.0.0.1")
    assert conn is not None
    deadline = session.armed[-1]
    assert deadline == session.now + session.config.request_timeout
    session.now = deadline - EARLY_WAKE_SLACK / 2
    session._timer_fired()
    # The idle HTTP socket's request timeout was due at the armed time: the tick ran as if on
    # time (the socket is to be closed), and the timer moved on.
    output = session.core._output_of(conn)
    assert output is not None and output.closing
    assert session.armed[-1] is None or session.armed[-1] > deadline


def test_a_timer_fired_well_before_its_deadline_only_rearms() -> None:
    session = TimerSession()
    session._start_core()
    conn = session._accept("127.0.0.1")
    assert conn is not None
    deadline = session.armed[-1]
    assert deadline is not None
    session.now = deadline - 10 * EARLY_WAKE_SLACK
    session._timer_fired()
    assert session.armed[-1] == deadline  # re-armed for the same deadline, nothing ticked
    output = session.core._output_of(conn)
    assert output is not None and not output.closing


# --------------------------------------------------------------------------- drift 3: hooks


class AsyncCallable:
    def __init__(self) -> None:
        self.seen: list[object] = []

    async def __call__(self, event: object) -> None:
        self.seen.append(event)


def test_an_object_with_an_async_call_is_awaited_as_a_coroutine_hook() -> None:
    hook = AsyncCallable()
    assert is_async(hook) and not is_async(print)
    server = FakeServer(on_connect=hook)
    server.connect("a")
    assert [type(e) for e in hook.seen] == [ClientConnected]


def test_a_hook_of_two_parameters_gets_the_server_and_can_publish() -> None:
    def echo(event: MessageReceived, server: FakeServer) -> None:
        server.publish("echo", event.text.upper())

    server = FakeServer(on_message=echo)
    listener = server.connect("l")
    listener.send_text("sub:echo")
    speaker = server.connect("s")
    speaker.send_text("hello")
    assert '{"topic":"echo","data":"HELLO"}' in listener.take()


def test_coroutine_hooks_beyond_the_queue_are_dropped_and_counted() -> None:
    seen: list[object] = []

    async def slow(event: object) -> None:
        seen.append(event)

    server = FakeServer(on_event=slow, hook_queue_size=2)
    server._running = True  # hold the queue: the hooks cannot run meanwhile
    for _ in range(3):
        server.connect()
    server._running = False
    server._run_jobs()
    assert server.dropped_events > 0
    assert len(seen) == 2


def test_a_hook_that_raises_is_logged_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    def bad(event: object) -> None:
        raise ValueError("boom")

    server = FakeServer(on_connect=bad)
    with caplog.at_level(logging.ERROR, logger="tank"):
        peer = server.connect("a")
    assert ".bad raised on ClientConnected" in caplog.text
    assert server.core.engine.is_open(peer.conn_id) and server.failure is None


# --------------------------------------------------------------------------- the poison rule


def test_a_failure_inside_the_core_stops_the_server_and_commands_say_why() -> None:
    session = TimerSession()
    session._start_core()

    def broken(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("bug")

    session._core = TankServer()  # a fresh core whose tick fails
    session._core.tick = broken  # type: ignore[method-assign,assignment]
    session._timer_fired()
    assert isinstance(session.failure, RuntimeError) and session.aborted == 1
    with pytest.raises(LocalProtocolError, match="failed") as raised:
        session.publish("t", "x")
    assert raised.value.__cause__ is session.failure


def test_the_callers_mistake_raises_and_changes_nothing() -> None:
    server = FakeServer()
    with pytest.raises(LocalProtocolError):
        server.publish(b"t", "x")  # type: ignore[arg-type]
    assert server.failure is None and server.publish("t", "x") == 0


def test_commands_after_shutdown_raise() -> None:
    server = FakeServer()
    peer = server.connect("a")
    server._begin_shutdown()
    assert peer.take()[-1:] == ["Server is shutting down"]
    with pytest.raises(LocalProtocolError, match="shutting down"):
        server.broadcast("x")
    assert server.stats().connections >= 0  # stats() still answers


# --------------------------------------------------------------------------- serve()'s arguments


def test_serve_arguments_become_config() -> None:
    server = FakeServer(authenticate=lambda r: True, authorize_subscribe=lambda c, t: True)
    assert server.config.authenticate and server.config.authorize_subscriptions
    with pytest.raises(ConfigError, match="authenticate"):
        FakeServer(ServerConfig(authenticate=True))
    with pytest.raises(ConfigError, match="authorize_subscribe"):
        FakeServer(ServerConfig(authorize_subscriptions=True))
    with pytest.raises(ConfigError, match="hook_queue_size"):
        FakeServer(hook_queue_size=0)


def test_fake_server_time_moves_only_when_told() -> None:
    server = FakeServer(ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=3.0),
                        clock=FakeClock(start=500.0))
    peer = server.connect("a")
    peer.auto_pong = False
    server.advance(2.9)
    peer.read()
    assert peer.close is None
    server.advance(0.2)
    peer.read()
    assert peer.close is not None and peer.close.code == 1011


def test_harness_apply_refuses_what_is_not_an_action() -> None:
    from tank_core.testing import Harness

    harness = Harness()
    with pytest.raises(LocalProtocolError, match=r"Harness\.apply takes the actions"):
        harness.apply(["publish news"])  # type: ignore[list-item]
    assert harness.log == []  # nothing of the batch was carried out


def test_the_core_reports_messages_only_when_a_hook_takes_them() -> None:
    # No hook for MessageReceived: the core skips making one per message (server/websocket.py).
    assert TimerSession()._core.message_notifications is False
    assert TimerSession(on_error=print)._core.message_notifications is False
    assert TimerSession(on_message=print)._core.message_notifications is True
    assert TimerSession(on_event=print)._core.message_notifications is True
