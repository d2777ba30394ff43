"""The session rules every client adapter shares (``tank_core.client.session``), on a fake clock.

``LinkedSession`` is a complete client adapter in a few lines: its sockets are ``Harness``
connections of a real ``TankServer``, its loop (``FakeLoop``) steps coroutines by hand and moves
the ``FakeClock`` only when nothing else can happen. The rules checked here are the ones the
adapters used to write twice: the command surface and its errors, batch order, callback policy,
the poison rule, the timer's early wake-up, entering and ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any

import pytest

from tank_core import ClientConfig, ConfigError, LocalProtocolError, ServerConfig
from tank_core.actions import AbortTransport, OpenConnection
from tank_core.client import ClientState, MessageArrived
from tank_core.client.connect import ClientConnect
from tank_core.client.dispatch import CALLBACK_GRACE, ClientCallbacks
from tank_core.client.session import CallbackJob, ClientSession, Flag
from tank_core.notifications import ClientDisconnected
from tank_core.server.session import EARLY_WAKE_SLACK
from tank_core.testing import FakeClock, Harness

URL = "ws://127.0.0.1:8080/ws"
SERVER = ServerConfig(heartbeat_interval=1.0, heartbeat_timeout=4.0, close_timeout=1.0)


class Cancelled(BaseException):
    """What a cancelled task of the fake loop gets."""


class FakeFlag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self) -> Awaitable[object]:
        return Waiting(self, None)


class Waiting:
    """Awaiting a flag (or the fake clock reaching ``until``) on the fake loop."""

    def __init__(self, flag: FakeFlag, until: float | None, clock: FakeClock | None = None) -> None:
        self.flag, self.until, self.clock = flag, until, clock

    def due(self) -> bool:
        return self.flag.is_set() or (
            self.until is not None and self.clock is not None and self.clock.now >= self.until
        )

    def __await__(self) -> Generator[Waiting, None, bool]:
        while not self.due():
            yield self
        return self.flag.is_set()


class Task:
    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.waiting: Waiting | None = None
        self.done = False
        self.result: object = None
        self.error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Coroutines stepped by hand; the clock jumps to the next deadline when nothing can run."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.tasks: list[Task] = []
        self.soon: list[Callable[[], None]] = []
        self.deadlines: list[Callable[[], float | None]] = []
        self.on_time: list[Callable[[], None]] = []
        self.between: list[Callable[[], None]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Task:
        task = Task(coro)
        self.tasks.append(task)
        return task

    def _step(self, task: Task) -> bool:
        if task.waiting is not None and not task.waiting.due() and not task.cancelled:
            return False
        try:
            if task.cancelled:
                task.cancelled = False
                yielded = task.coro.throw(Cancelled())
            else:
                yielded = task.coro.send(None)
        except StopIteration as stop:
            task.done, task.result = True, stop.value
        except BaseException as exc:  # kept for the test to look at
            task.done, task.error = True, exc
        else:
            task.waiting = yielded if isinstance(yielded, Waiting) else None
        return True

    def run_once(self) -> bool:
        moved = False
        while self.soon:
            self.soon.pop(0)()
            moved = True
        for task in list(self.tasks):
            if not task.done and self._step(task):
                moved = True
        for hook in self.between:
            hook()
        self.tasks = [t for t in self.tasks if not t.done]
        return moved

    def run(self, main: Coroutine[Any, Any, Any], *, limit: float = 600.0) -> object:
        """Run ``main`` (and whatever it spawns) to its end; the clock moves as needed."""
        task = self.spawn(main)
        give_up = self.clock.now + limit
        while not task.done:
            if self.run_once():
                continue
            candidates = [d() for d in self.deadlines]
            candidates += [t.waiting.until for t in self.tasks if t.waiting is not None]
            due = [d for d in candidates if d is not None]
            assert due, "everything waits and nothing is scheduled"
            when = max(min(due), self.clock.now)
            assert when <= give_up, "the fake loop ran out of time"
            self.clock.jump_to(when)
            for fire in self.on_time:
                fire()
        if task.error is not None:
            raise task.error
        return task.result


class FakeLink:
    """A client connection: the ``Harness`` connection behind it, once open."""

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        self.server_id: int | None = None


class LinkedSession(ClientSession[FakeLink]):
    """A client adapter over ``Harness`` connections, on ``FakeLoop``."""

    def __init__(
        self,
        harness: Harness,
        loop: FakeLoop,
        config: ClientConfig,
        callbacks: ClientCallbacks | None = None,
    ) -> None:
        self.harness = harness
        self.loop = loop
        self.executed: list[OpenConnection | AbortTransport] = []
        self.armed: list[float | None] = []
        self.timer_at: float | None = None
        self.refuse = False
        self.reachable = True
        super().__init__(config, callbacks)
        loop.deadlines += [lambda: self.timer_at, self._server_deadline]
        loop.on_time.append(self._on_time)
        loop.between.append(self.pump)

    # the adapter's part -----------------------------------------------------------------

    def _clock(self) -> float:
        return self.harness.clock.now

    def _wall(self) -> float:
        return self.harness.clock.wall_time

    def _connect(self, action: OpenConnection) -> FakeLink:
        self.executed.append(action)
        link = FakeLink(action.conn_id)
        if self.refuse:
            self.loop.soon.append(lambda: self._gone(link, "ConnectionRefusedError: no"))
        else:
            link.server_id = self.harness.accept()

            def opened() -> None:
                if not self._opened(link):
                    self._close_server_side(link)

            self.loop.soon.append(opened)
        return link

    def _disconnect(self, link: FakeLink) -> None:
        self.executed.append(AbortTransport(conn_id=link.conn_id))
        self._close_server_side(link)

    def _output_ready(self, link: FakeLink) -> None:
        while (data := self.core.data_to_send(link.conn_id)) is not None:
            if not data:
                return
            if link.server_id is not None and self.reachable:
                self.harness.feed(link.server_id, data)
        self._close_server_side(link)
        self.loop.soon.append(lambda: self._gone(link))

    def _arm(self, deadline: float | None) -> None:
        self.armed.append(deadline)
        self.timer_at = deadline

    def _spawn(self, job: CallbackJob) -> None:
        task = self.loop.spawn(job.run())
        job.cancel = task.cancel

    def _flag(self) -> Flag:
        return FakeFlag()

    async def _wait(self, flag: Flag, timeout: float | None) -> bool:
        assert isinstance(flag, FakeFlag)
        until = None if timeout is None else self.harness.clock.now + timeout
        return await Waiting(flag, until, self.harness.clock)

    # the fake world ---------------------------------------------------------------------

    def _close_server_side(self, link: FakeLink) -> None:
        server_id, link.server_id = link.server_id, None
        if server_id is not None and self.harness.transports[server_id].state == "open":
            self.harness.peer_closed(server_id)

    def _server_deadline(self) -> float | None:
        return self.harness.server.next_deadline() if self.reachable else None

    def _on_time(self) -> None:
        if self.reachable:
            self.harness.tick()
        if self.timer_at is not None and self.harness.clock.now >= self.timer_at:
            self.timer_at = None
            self._timer_fired()

    def pump(self) -> None:
        """Carry what the server wrote to the current connection (and its end) to the client."""
        link = self._current_link()
        server_id = None if link is None else link.server_id
        if link is None or server_id is None or not self.reachable:
            return
        data = self.harness.flush(server_id)
        if data:
            self._received(link, data)
        if self.harness.transports[server_id].state in ("closed", "aborted"):
            self._gone(link)

    @property
    def server_ids(self) -> list[int]:
        return [link.server_id for link in self._links.values() if link.server_id is not None]


def world(
    *, reconnect: bool = True, callbacks: ClientCallbacks | None = None, **options: Any
) -> tuple[LinkedSession, FakeLoop, Harness]:
    clock = FakeClock(70000.0)
    harness = Harness(SERVER, clock=clock)
    loop = FakeLoop(clock)
    config = ClientConfig(
        url=URL, reconnect=reconnect, heartbeat_interval=1.0, heartbeat_timeout=3.0,
        reconnect_initial_delay=0.25, reconnect_max_delay=1.0, connect_timeout=2.0, **options,
    )
    return LinkedSession(harness, loop, config, callbacks), loop, harness


async def entered(session: LinkedSession) -> None:
    session._begin()
    await session.wait_open()


def publish(harness: Harness, topic: str, data: str) -> None:
    _count, actions = harness.server.publish(
        topic, data, now=harness.now, wall_time=harness.clock.wall_time
    )
    harness.apply(actions)


async def sleep(loop: FakeLoop, seconds: float) -> None:
    await Waiting(FakeFlag(), loop.clock.now + seconds, loop.clock)


# =========================================================================== the command surface


def test_commands_need_a_running_client_and_say_so() -> None:
    session, loop, _ = world()

    async def before_start() -> None:
        for command in (session.subscribe("t"), session.unsubscribe("t"), session.send("x")):
            with pytest.raises(LocalProtocolError, match="not running"):
                await command
        with pytest.raises(LocalProtocolError, match="not running"):
            session.messages("t")
        with pytest.raises(LocalProtocolError, match="not running"):
            await session.wait_closed()
        await session.close()  # never raises

    loop.run(before_start())
    assert session.executed == [] and not session.closed


def test_the_callers_mistakes_raise_and_change_nothing() -> None:
    session, loop, harness = world()

    async def main() -> None:
        await entered(session)
        with pytest.raises(LocalProtocolError):
            await session.subscribe(b"bytes")  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            await session.send(3)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError, match="max_queued"):
            session.messages("t", max_queued=0)
        with pytest.raises(LocalProtocolError):
            await session.close(1006)
        with pytest.raises(LocalProtocolError, match="already started"):
            session._begin()
        assert session.connected and session.failure is None
        await session.subscribe("news")
        await sleep(loop, 0.1)
        (server_id,) = session.server_ids
        assert harness.server.engine.topics_of(server_id) == {"news"}

    loop.run(main())


def test_a_batch_is_carried_out_before_its_callbacks() -> None:
    """docs/client.md: first every write and connection change of the batch, then the callbacks
    in the core's order."""
    seen: list[tuple[object, ...]] = []

    def state() -> tuple[object, ...]:
        last = session.executed[-1]
        return (type(last).__name__, session.core.buffered, session.timer_at)

    def on_timeout(silent_for: float) -> None:
        seen.append(("timeout", silent_for, *state()))
        session.reachable = True  # the server runs again

    session, loop, _harness = world(callbacks=ClientCallbacks(
        on_heartbeat_timeout=on_timeout,
        on_close=lambda code, reason: seen.append(("close", code, reason, *state())),
        on_reconnect=lambda attempt: seen.append(("reconnect", attempt, *state())),
    ))

    async def main() -> None:
        await entered(session)
        await session.subscribe("news")
        session.reachable = False  # frozen: silence
        await sleep(loop, 6.0)

    loop.run(main())
    deadline = session.core.next_deadline()
    timeout, close, reconnect = seen
    # The abort of the silent connection and the timer for the retry come before the callbacks.
    assert timeout[:2] == ("timeout", 3.0) and timeout[2:4] == ("AbortTransport", 0)
    assert close == ("close", 1006, "heartbeat timeout", "AbortTransport", 0, timeout[4])
    assert isinstance(timeout[4], float) and timeout[4] > loop.clock.now - 6.0
    # The new connection's sub: frames were taken for its socket before on_reconnect.
    assert reconnect[:4] == ("reconnect", 1, "OpenConnection", 0)
    assert deadline is not None


# =========================================================================== callbacks


def test_plain_callbacks_run_inline_awaitables_as_tasks_in_order_and_errors_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[object] = []
    finished: list[object] = []

    async def slow(data: object, message: MessageArrived) -> None:
        started.append(data)
        await sleep(loop, 0.5)
        finished.append(data)

    def broken(message: MessageArrived) -> None:
        raise ValueError("boom in on_message")

    async def broken_later(data: object, message: MessageArrived) -> None:
        raise RuntimeError("boom in a task")

    session, loop, harness = world(callbacks=ClientCallbacks(on_message=broken))

    async def main() -> None:
        await entered(session)
        await session.subscribe("news", slow)
        await session.subscribe("bad", broken_later)
        await sleep(loop, 0.1)
        for n in range(3):
            publish(harness, "news", str(n))
        publish(harness, "bad", "x")
        await sleep(loop, 0.2)
        assert started == ["0", "1", "2"] and finished == []
        await sleep(loop, 1.0)
        assert finished == ["0", "1", "2"]
        assert session.connected

    with caplog.at_level(logging.ERROR, logger="tank"):
        loop.run(main())
    raised = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert raised.count("boom in on_message") == 4  # one per message (Hello is no message)
    assert "boom in a task" in caplog.text
    assert not session._jobs


def test_close_waits_for_callbacks_then_cancels_the_stuck_ones_but_not_its_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcome: list[str] = []

    async def quick(data: object, message: MessageArrived) -> None:
        await sleep(loop, 0.5)
        outcome.append("quick")

    async def stuck(data: object, message: MessageArrived) -> None:
        try:
            await sleep(loop, 3600.0)
        except Cancelled:
            outcome.append("stuck cancelled")
            raise

    async def closer(data: object, message: MessageArrived) -> None:
        await session.close()  # from a callback: close() does not wait for its own task
        outcome.append(f"closed at +{loop.clock.now - began:.1f}")

    session, loop, harness = world()
    began = 0.0

    async def main() -> None:
        nonlocal began
        await entered(session)
        for topic, callback in (("quick", quick), ("stuck", stuck), ("close", closer)):
            await session.subscribe(topic, callback)
        await sleep(loop, 0.1)
        began = loop.clock.now
        for topic in ("quick", "stuck", "close"):
            publish(harness, topic, "x")
        await session.wait_closed()
        await sleep(loop, CALLBACK_GRACE + 1.0)

    with caplog.at_level(logging.WARNING, logger="tank"):
        loop.run(main())
    assert sorted(outcome) == sorted(["quick", f"closed at +{CALLBACK_GRACE:.1f}", "stuck cancelled"])
    assert outcome[0] == "quick"
    assert "callback task" in caplog.text and "stuck" in caplog.text
    assert session.closed and not session._jobs


def test_callbacks_returned_after_close_gave_up_are_discarded() -> None:
    session, _loop, _ = world()
    ran: list[str] = []

    async def later() -> None:
        ran.append("ran")

    session._stop_callbacks()
    session._call(lambda: later())
    assert ran == [] and not session._jobs


# =========================================================================== the poison rule


def test_a_core_failure_closes_for_good_and_commands_then_raise_chained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(Exception):
        pass

    closes: list[int] = []
    session, loop, harness = world(callbacks=ClientCallbacks(on_close=lambda c, r: closes.append(c)))

    def broken(event: object) -> Any:
        raise Boom("core bug")

    async def main() -> None:
        await entered(session)
        stream = session.messages("news")
        session.core.receive = broken  # type: ignore[method-assign]
        harness.apply(harness.server.broadcast("anything", now=loop.clock.now, wall_time=0.0)[1])
        await session.wait_closed()
        assert isinstance(session.failure, Boom)
        assert session.closed and not session.connected
        assert isinstance(session.executed[-1], AbortTransport)
        assert session.armed[-1] is None and session.timer_at is None
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        with pytest.raises(LocalProtocolError, match="failed") as raised:
            await session.send("x")
        assert raised.value.__cause__ is session.failure
        await session.close()  # returns at once, raises nothing
        session._received(FakeLink(1), b"more")  # ignored
        session._timer_fired()  # ignored

    with caplog.at_level(logging.ERROR, logger="tank"):
        loop.run(main())
    assert "tank client failed" in caplog.text
    assert closes == []  # a failure is no connection end
    assert all(server.state != "open" for server in harness.transports.values())


def test_an_unexpected_error_from_a_command_poisons_and_propagates() -> None:
    session, loop, _ = world()

    def broken(topic: str, *, now: float) -> Any:
        raise KeyError("core bug")

    async def main() -> None:
        await entered(session)
        session.core.subscribe = broken  # type: ignore[method-assign]
        with pytest.raises(KeyError):
            await session.subscribe("t")
        assert isinstance(session.failure, KeyError) and session.closed

    loop.run(main())


# =========================================================================== the timer


def test_the_timer_ticks_at_the_armed_deadline_when_it_fires_a_hair_early() -> None:
    session, loop, _ = world()
    ticks: list[float] = []
    real_tick = session.core.tick

    def tick(now: float) -> Any:
        ticks.append(now)
        return real_tick(now)

    async def main() -> None:
        await entered(session)
        session.core.tick = tick  # type: ignore[method-assign]
        deadline = session.core.next_deadline()
        assert deadline is not None and session.armed[-1] == deadline
        # Far too early: it was moved since; nothing is ticked, the timer is armed again.
        loop.clock.jump_to(deadline - 0.01)
        session.timer_at = None
        session._timer_fired()
        assert ticks == [] and session.timer_at == deadline
        # A hair early (coarse clock steps): tick at the deadline itself.
        loop.clock.jump_to(deadline - EARLY_WAKE_SLACK / 2)
        session.timer_at = None
        session._timer_fired()
        assert ticks == [deadline]
        after = session.core.next_deadline()
        assert after is not None and after > deadline and session.timer_at == after

    loop.run(main())


# =========================================================================== entering, closing


def test_entering_without_reconnect_a_refused_attempt_is_a_connection_error() -> None:
    closes: list[tuple[int, str]] = []
    session, loop, _ = world(
        reconnect=False, callbacks=ClientCallbacks(on_close=lambda c, r: closes.append((c, r)))
    )
    session.refuse = True
    with pytest.raises(ConnectionError, match=f"cannot connect to {URL}: ConnectionRefusedError"):
        loop.run(entered(session))
    assert closes == [(1006, "ConnectionRefusedError: no")] and session.closed


def test_entering_with_reconnect_gives_up_after_connect_timeout() -> None:
    session, loop, _ = world()
    session.refuse = True
    start = loop.clock.now
    with pytest.raises(TimeoutError, match=r"within 2 s \(last error: ConnectionRefusedError"):
        loop.run(entered(session))
    assert loop.clock.now == start + 2.0
    assert len(session.executed) >= 3 and not session.closed  # the caller closes it (below)
    loop.run(session.close())
    assert session.closed and session.core.finished


def test_close_ends_with_the_servers_close_and_every_connection_gone() -> None:
    closes: list[tuple[int, str, bool]] = []
    session, loop, harness = world(
        callbacks=ClientCallbacks(on_close=lambda c, r: closes.append((c, r, session.closed)))
    )

    async def main() -> None:
        await entered(session)
        stream = session.messages("t")
        await session.close(4000, "bye")
        assert session.core.finished and session.closed
        assert closes == [(4000, "bye", True)]
        gone = [n for n in harness.notifications if isinstance(n, ClientDisconnected)]
        assert [n.code for n in gone] == [4000]
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        for command in (session.subscribe("x"), session.unsubscribe("t"), session.send("x")):
            with pytest.raises(LocalProtocolError, match="closed"):
                await command
        await session.close()  # idempotent
        await session.wait_closed()

    loop.run(main())


def test_close_against_a_frozen_server_takes_close_timeout() -> None:
    session, loop, _ = world()

    async def main() -> None:
        await entered(session)
        session.reachable = False
        start = loop.clock.now
        await session.close()
        assert loop.clock.now == start + session.config.close_timeout
        assert isinstance(session.executed[-1], AbortTransport)

    loop.run(main())


def test_messages_streams_get_their_topic_in_order_and_end_on_unsubscribe() -> None:
    session, loop, harness = world()

    async def main() -> None:
        await entered(session)
        stream = session.messages("news")
        await sleep(loop, 0.1)
        for n in range(3):
            publish(harness, "news", str(n))
        assert [(await stream.__anext__()).data for _ in range(3)] == ["0", "1", "2"]
        waiter = loop.spawn(stream.__anext__())
        await sleep(loop, 0.1)
        assert not waiter.done
        await session.unsubscribe("news")
        await sleep(loop, 0.1)
        assert waiter.done and isinstance(waiter.error, StopAsyncIteration)
        closed_early = session.messages("other")
        await closed_early.aclose()
        with pytest.raises(StopAsyncIteration):
            await closed_early.__anext__()

    loop.run(main())


# =========================================================================== connect(...)


def _linked(config: ClientConfig, callbacks: ClientCallbacks, ssl_context: object) -> LinkedSession:
    clock = FakeClock(70000.0)
    return LinkedSession(Harness(SERVER, clock=clock), FakeLoop(clock), config, callbacks)


class Connect(ClientConnect[LinkedSession], client=_linked):
    @contextlib.asynccontextmanager
    async def _session(self, client: LinkedSession) -> AsyncIterator[LinkedSession]:
        await entered(client)
        try:
            yield client
        finally:
            await client.close()


def test_connect_validates_its_settings_at_the_call_and_builds_the_client() -> None:
    with pytest.raises(ConfigError):
        Connect("http://127.0.0.1:1/ws")
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        Connect(URL, heartbeat_interval=5, heartbeat_timeout=5)

    def on_close(code: int, reason: str) -> None:
        pass

    made = Connect(URL, "alice", "secret", False, reconnect=False, on_close=on_close,
                   send_queue_limit=3)
    client = made.client
    assert isinstance(client, LinkedSession)
    assert client.config == ClientConfig(
        url=URL, user_id="alice", token="secret", heartbeat=False, reconnect=False,
        send_queue_limit=3,
    )
    assert client._dispatcher.callbacks == ClientCallbacks(on_close=on_close)
    assert client.url == URL and client.user_id == "alice" and client.topics == ()
    assert client.latency is None and not client.connected and not client.closed
    assert client.core.state is ClientState.IDLE


def test_connect_enters_and_leaves_through_the_adapters_session() -> None:
    closes: list[int] = []
    made = Connect(URL, on_close=lambda code, reason: closes.append(code))
    client = made.client

    async def use() -> None:
        async with made as entered_client:
            assert entered_client is client and client.connected
        assert client.closed and client.core.finished

    client.loop.run(use())
    assert closes == [1000]
