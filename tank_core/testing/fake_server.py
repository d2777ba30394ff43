"""A fake of the embedding server API on the fake clock: test application code written against
``server.publish(...)`` and the hooks of ``tank_asyncio.serve``/``tank_trio.serve`` without a socket.

``FakeServer`` is a ``ServerSession`` (the same session rules as the real adapters: hook dispatch,
verdicts, the poison rule) whose sockets are a ``Harness``'s fake transports. Peers made with
``connect()`` speak real RFC 6455 bytes. Coroutine hooks and async verdicts run to completion at
the end of each call into the server, so a test reads what happened right after it happened; they
may await other coroutines but nothing that needs an event loop (a sleep, a socket).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from ..actions import AbortTransport, Action, OpenConnection, PauseReading, ResumeReading
from ..config import ServerConfig
from ..errors import LocalProtocolError
from ..notifications import Notification
from ..server.hooks import HOOK_QUEUE_SIZE, Hook, SubscribeHook
from ..server.session import AuthHook, ServerSession
from .clock import FakeClock
from .harness import Harness, HttpAnswer
from .peer import FakePeer

__all__ = ["FakeServer"]


class _SessionHarness(Harness):
    """A Harness whose actions go through the session's rules instead of its own."""

    session: FakeServer

    def apply(self, actions: Iterable[Action]) -> list[Action]:
        done = list(actions)
        self.log.extend(done)
        self.session._deliver(done)
        self.session._run_jobs()
        return done


class FakeServer(ServerSession):
    """``publish``, ``broadcast``, ``send``, ``disconnect``, ``stats`` and the hooks of the real
    servers, on a ``FakeClock``. ``connect()`` opens a peer; ``advance()`` moves time."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        clock: FakeClock | None = None,
        seed: int = 0,
        authenticate: AuthHook | None = None,
        authorize_subscribe: SubscribeHook | None = None,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_message: Hook | None = None,
        on_error: Hook | None = None,
        on_event: Hook | None = None,
        hook_queue_size: int = HOOK_QUEUE_SIZE,
    ) -> None:
        super().__init__(
            config,
            authenticate=authenticate,
            authorize_subscribe=authorize_subscribe,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_message=on_message,
            on_error=on_error,
            on_event=on_event,
            hook_queue_size=hook_queue_size,
        )
        harness = _SessionHarness(clock=clock if clock is not None else FakeClock(seed=seed),
                                  server=self._core)
        harness.session = self
        #: The fake sockets and the clock (``harness.notifications``: every notification).
        self.harness = harness
        self.clock = harness.clock
        self._jobs: list[Callable[[], Awaitable[None]]] = []
        self._turn_due = False
        self._running = False
        self._start_core()

    # ------------------------------------------------------------------ for the test

    def connect(self, user_id: str | None = None, **options: Any) -> FakePeer:
        """Open a WebSocket connection (``Harness.connect``); the peer has read its Hello."""
        return self.harness.connect(user_id, **options)

    def http(self, method: str, target: str, **options: Any) -> HttpAnswer:
        """One HTTP request to the API (``Harness.http``)."""
        return self.harness.http(method, target, **options)

    def advance(self, seconds: float) -> None:
        """Move the clock, ticking at every deadline on the way."""
        self.harness.advance(seconds)

    @property
    def notifications(self) -> list[Notification]:
        """Every notification so far, in order (what ``on_event`` sees)."""
        return self.harness.notifications

    # ------------------------------------------------------------------ the adapter's part

    def _clock(self) -> float:
        return self.harness.clock.now

    def _wall(self) -> float:
        return self.harness.clock.wall_time

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        self.harness.carry_out(action)

    def _output_ready(self) -> None:
        self.harness._closes()

    def _turn_wanted(self) -> None:
        # The next "loop turn" is the next round of jobs: what the others queued runs first.
        if not self._turn_due:
            self._turn_due = True
            self._jobs.append(self._next_turn)

    async def _next_turn(self) -> None:
        self._turn_due = False
        self._end_turn()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        self._jobs.append(job)

    def _hooks_waiting(self) -> None:
        self._jobs.append(self._run_queued_hooks)

    def _arm(self, deadline: float | None) -> None:
        pass  # the clock moves only in advance(), which ticks at every deadline

    def _abort_all(self) -> None:
        for transport in self.harness.transports.values():
            if transport.state not in ("closed", "aborted"):
                transport.state = "aborted"

    def _notify(self, event: Notification) -> None:
        self.harness.notifications.append(event)
        super()._notify(event)

    def _deliver(self, actions: list[Action]) -> None:
        super()._deliver(actions)
        self._run_jobs()

    def _run_jobs(self) -> None:
        """Run spawned jobs and queued hooks to the end (not from inside another job)."""
        if self._running:
            return
        self._running = True
        try:
            while self._jobs:
                job = self._jobs.pop(0)
                _run_to_end(job())
        finally:
            self._running = False

    async def shutdown(self) -> None:
        """Graceful shutdown, as the real servers begin it; advance the clock to let peers go."""
        self._begin_shutdown()


def _run_to_end(awaitable: Awaitable[None]) -> None:
    coroutine: Coroutine[Any, Any, None] = awaitable  # type: ignore[assignment]
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise LocalProtocolError(
        "a hook or verdict of a FakeServer awaited something that needs an event loop; "
        "FakeServer runs coroutines that finish without suspending"
    )
