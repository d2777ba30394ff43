"""The session rules every client adapter shares, written once: an adapter's ``Client`` is a
``ClientSession`` that supplies sockets, a clock, sleeping and spawning, and nothing else.

What is decided here, for asyncio, trio and any transport of yours alike (docs/client.md):

- the command surface: ``subscribe``, ``unsubscribe``, ``messages``, ``send``, ``close``,
  ``wait_closed`` and entering (``wait_open``), with a ``LocalProtocolError`` saying what is wrong
  when the client is not running or has failed;
- the connections: each ``OpenConnection`` becomes the adapter's handle (``_connect``), kept by
  ``conn_id`` until ``AbortTransport`` (``_disconnect``) or until the adapter reports it gone;
  what the adapter reports about a handle the core dropped is ignored;
- each batch of core actions is carried out in order, then the connections with output are
  named (``_output_ready``), then the notifications are routed (``client_dispatch``): log lines,
  callbacks, ``messages()`` streams;
- callbacks: plain functions inline, awaitables they return as one task each (``_spawn``), started
  in call order; exceptions logged; ``close()`` waits ``CALLBACK_GRACE`` for them, then cancels;
- the poison rule (DESIGN.md §4): the caller's mistake raises ``LocalProtocolError`` and changes
  nothing; any other failure inside the core closes the client for good (``AbortTransport`` for
  every connection), and leaving the block re-raises it;
- the one timer: ticks at the armed deadline when it fires at most ``EARLY_WAKE_SLACK`` early.

The adapter overrides the ``_`` methods in the "supplied by the adapter" section below. Nothing
here does I/O, starts a task or reads a clock.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from .._timer import tick_time
from ..actions import AbortTransport, OpenConnection
from ..config import ClientConfig
from ..describe import callable_name
from ..errors import LocalProtocolError
from ..events import BytesReceived, ConnectionOpened, TransportClosed
from .dispatch import (
    CALLBACK_GRACE,
    Call,
    ClientCallbacks,
    ClientDispatch,
    TopicCallback,
)
from .machine import ClientAction, ClientState, TankClient
from .streams import (
    MESSAGES_MAX_QUEUED,
    Flag,
    MessageStream,
    TopicStreams,
    check_max_queued,
)

if TYPE_CHECKING:
    import ssl

__all__ = ["CallbackJob", "ClientSession", "Flag", "Link", "MessageStream"]

logger = logging.getLogger("tank")

#: The callback job the current task runs, if any (``close()`` from a callback does not wait for it).
_CURRENT_JOB: contextvars.ContextVar[CallbackJob | None] = contextvars.ContextVar(
    "tank_client_job", default=None
)


class Link(Protocol):
    """The adapter's handle on one connection: anything that knows its ``conn_id``."""

    conn_id: int


L = TypeVar("L", bound=Link)


class CallbackJob:
    """One awaitable a callback returned, run as its own task by the adapter (``_spawn``).

    The adapter sets ``cancel`` once the job runs (how to cancel its task) and awaits ``run()``;
    a job that is never run is ``discard()``-ed. Either way the session hears that it ended.
    """

    __slots__ = ("_awaitable", "_ended", "cancel", "cancelled", "done", "fn")

    def __init__(
        self, fn: object, awaitable: Awaitable[object], ended: Callable[[CallbackJob], None]
    ) -> None:
        self._ended = ended
        self.fn = fn
        self._awaitable = awaitable
        #: Cancels the task running the job (set by the adapter when it starts it).
        self.cancel: Callable[[], object] | None = None
        self.cancelled = False
        self.done = False

    @property
    def name(self) -> str:
        return callable_name(self.fn)

    async def run(self) -> None:
        if self.done:
            return
        _CURRENT_JOB.set(self)
        try:
            await self._awaitable
        except Exception:
            logger.exception("tank client: callback %s raised", self.name)
        finally:
            self._ended(self)

    def discard(self) -> None:
        """Never run it (the client is going away): close it without a "never awaited" warning."""
        if self.done:
            return
        close = getattr(self._awaitable, "close", None)
        if callable(close):
            close()
        self._ended(self)


class ClientSession(ABC, Generic[L]):
    """Everything a client adapter does that is not I/O (see the module header); ``L`` is the
    adapter's handle on a connection."""

    def __init__(
        self,
        config: ClientConfig,
        callbacks: ClientCallbacks | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        #: For ``wss://``: the adapter's TLS context (None: ``ssl.create_default_context()``).
        self._ssl_context = ssl_context
        self._core = TankClient(config)
        #: Which callbacks each notification calls; the last error; whether any connection opened.
        self._dispatcher = ClientDispatch(config.url, callbacks or ClientCallbacks())
        self._streams = TopicStreams()
        self._started = False
        #: The failure that closed the client (the poison rule), re-raised when the block is left.
        self.failure: BaseException | None = None
        self._armed: float | None = None
        #: The connections opened for the core and not dropped or reported gone since.
        self._links: dict[int, L] = {}
        #: Set once the first connection opened, or the client closed before it did.
        self._settled = self._flag()
        #: Set once the client is closed for good.
        self._closed = self._flag()
        #: Set once it is closed for good and every connection is gone.
        self._done = self._flag()
        #: Callback jobs spawned and not ended yet.
        self._jobs: set[CallbackJob] = set()
        self._jobs_changed: Flag | None = None
        #: Set when ``close()`` gave up on callbacks (or the adapter tears down): no new jobs.
        self._jobs_stopped = False

    # ------------------------------------------------------------------ supplied by the adapter

    @abstractmethod
    def _clock(self) -> float:
        """The adapter's monotonic clock."""

    @abstractmethod
    def _wall(self) -> float:
        """Wall-clock seconds since the epoch (data for the events)."""

    @abstractmethod
    def _connect(self, action: OpenConnection) -> L:
        """Start opening a connection (``tls``: with ``ssl_context``, hostname checked against
        ``host``); its handle. Then report it with ``_opened``, ``_received`` and ``_gone``."""

    @abstractmethod
    def _disconnect(self, link: L) -> None:
        """Drop ``link`` now (or give up opening it); nothing more is reported about it."""

    @abstractmethod
    def _output_ready(self, link: L) -> None:
        """``link`` has bytes waiting in the core (``core.data_to_send``); None from it means:
        close the connection once what was taken is written, then ``_gone``."""

    @abstractmethod
    def _arm(self, deadline: float | None) -> None:
        """Move the one timer to ``deadline`` (None: never); it calls ``_timer_fired``."""

    @abstractmethod
    def _spawn(self, job: CallbackJob) -> None:
        """Run ``await job.run()`` as a task of its own (jobs start in call order); set
        ``job.cancel`` to what cancels that task."""

    @abstractmethod
    def _flag(self) -> Flag:
        """A new one-shot event of the loop."""

    @abstractmethod
    async def _wait(self, flag: Flag, timeout: float | None) -> bool:
        """Wait until ``flag`` is set, or ``timeout`` seconds (None: no limit); True if set."""

    async def _checkpoint_in(self) -> None:
        """Before a command (trio: raise if cancelled); nothing by default."""
        return None

    async def _checkpoint_out(self) -> None:
        """After a command (trio: let others run); nothing by default."""
        return None

    async def _room(self) -> None:
        """After ``send()``: wait while the current connection cannot take more bytes."""
        await self._checkpoint_out()

    # ------------------------------------------------------------------ the client object's API

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def user_id(self) -> str | None:
        """The id the server's latest Hello named; before it, the ``user_id`` given to ``connect``."""
        return self._core.user_id

    @property
    def latency(self) -> float | None:
        """The last Ping round-trip time in seconds (None until a Pong came back)."""
        return self._core.latency

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics held: subscribed now if open, and again after every reconnect."""
        return self._core.topics

    @property
    def connected(self) -> bool:
        """True while a WebSocket is open."""
        return self.failure is None and self._core.state is ClientState.OPEN

    @property
    def closed(self) -> bool:
        """True once the client is closed for good (no reconnect follows)."""
        return self._closed.is_set()

    @property
    def core(self) -> TankClient:
        """The sans-IO client underneath (for tests and tools; do not drive it directly)."""
        return self._core

    async def subscribe(self, topic: str, callback: TopicCallback | None = None) -> None:
        """Hold ``topic`` (``sub:`` now if open, and after every reconnect); ``callback(data,
        message)`` is called once per message of it. A non-None callback replaces the topic's
        previous one; None keeps it."""
        await self._checkpoint_in()
        self._command(lambda now: self._core.subscribe(topic, now=now))
        self._dispatcher.subscribed(topic, callback)
        await self._checkpoint_out()

    async def unsubscribe(self, topic: str) -> None:
        """Stop holding ``topic``: ``unsub:`` if open; its callback is forgotten, its streams end."""
        await self._checkpoint_in()
        self._command(lambda now: self._core.unsubscribe(topic, now=now))
        self._dispatcher.unsubscribed(topic)
        self._streams.end_topic(topic)
        await self._checkpoint_out()

    def messages(
        self, topic: str, *, max_queued: int = MESSAGES_MAX_QUEUED, recoveries: bool = False
    ) -> MessageStream:
        """An async iterator over the messages of ``topic`` (held from now on if it was not).
        ``recoveries=True``: it also yields the outcome of each recovery (the recovery extension):
        an item whose ``recovered`` is True (nothing missed) or False (reload your state)."""
        self._check_running()
        check_max_queued(max_queued)
        if not isinstance(recoveries, bool):
            raise LocalProtocolError(f"recoveries must be True or False, got {recoveries!r}")
        self._command(lambda now: self._core.subscribe(topic, now=now))
        stream = MessageStream(self, topic, max_queued)
        stream.recoveries = recoveries
        self._streams.add(stream)
        return stream

    async def send(self, text: str) -> None:
        """Send ``text`` (relayed by the server to every other client). While disconnected it is
        queued (up to ``send_queue_limit``, then ``LocalProtocolError``) and written in order
        after the next open. Waits while the connection cannot take more bytes."""
        await self._checkpoint_in()
        self._command(lambda now: self._core.send(text, now=now))
        await self._room()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good (Close frame ``code``/``reason`` if open); no reconnect follows.
        Idempotent. Returns once the closing handshake is over (the server's Close, or
        ``close_timeout``), the connections are gone and asynchronous callbacks have finished."""
        if not self._started:
            await self._checkpoint_out()
            return
        if self.failure is None and self._core.state is not ClientState.CLOSED:
            self._command(lambda now: self._core.close(code, reason, now=now))
        if self.failure is None:
            # The core bounds both: close_timeout for the server's Close, then for the socket.
            await self._done.wait()
        await self._finish_callbacks()

    async def wait_closed(self) -> None:
        """Return once the client is closed for good (``close()``, or a loss with reconnect off)."""
        if not self._started:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        await self._closed.wait()

    async def wait_open(self) -> None:
        """Return once the first connection opened. Else, with ``reconnect=False``,
        ``ConnectionError`` once the attempt failed; with ``reconnect=True``, ``TimeoutError``
        when nothing opened within ``connect_timeout``; the poison rule's failure if any."""
        config = self.config
        timeout = config.connect_timeout if config.reconnect else None
        if not await self._wait(self._settled, timeout):
            raise self._dispatcher.no_connection(config.connect_timeout)
        if self.failure is not None:
            raise self.failure
        if not self._dispatcher.opened_once:
            raise self._dispatcher.cannot_connect()

    # ------------------------------------------------------------------ driving the core

    def _begin(self) -> None:
        """Start the first attempt (the adapter's entering calls it, then ``wait_open``)."""
        if self._started:
            raise LocalProtocolError("this client was already started")
        self._started = True
        self._command(lambda now: self._core.start(now=now))

    def _check_running(self) -> None:
        if not self._started:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        if self.failure is not None:
            raise LocalProtocolError(
                "the client failed (see the chained exception); create a new one"
            ) from self.failure

    def _command(self, call: Callable[[float], list[ClientAction]]) -> None:
        """An application call into the core: its misuse (LocalProtocolError) is the caller's;
        anything else is a bug in the core, which is then poisoned."""
        self._check_running()
        try:
            actions = call(self._clock())
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        self._deliver(actions)

    def _feed(self, call: Callable[[float], list[ClientAction]]) -> None:
        """A transport or timer event into the core; a failure poisons it."""
        if self.failure is not None:
            return
        try:
            actions = call(self._clock())
        except Exception as exc:
            self._fail(exc)
            return
        self._deliver(actions)

    def _current_link(self) -> L | None:
        """The handle of the core's current connection, if any."""
        conn_id = self._core.conn_id
        return None if conn_id is None else self._links.get(conn_id)

    def _current(self, link: L) -> bool:
        """Whether the core still holds ``link`` (neither dropped nor reported gone)."""
        return self._links.get(link.conn_id) is link

    def _opened(self, link: L) -> bool:
        """``link`` is open; False when the core dropped it meanwhile (close it)."""
        if not self._current(link):
            return False
        conn_id = link.conn_id
        self._feed(lambda now: self._core.receive(
            ConnectionOpened(conn_id=conn_id, now=now, wall_time=self._wall())))
        return True

    def _received(self, link: L, data: bytes) -> None:
        """Bytes read from ``link``."""
        conn_id = link.conn_id
        self._feed(lambda now: self._core.receive(
            BytesReceived(conn_id=conn_id, data=data, now=now, wall_time=self._wall())))

    def _gone(self, link: L, error: str | None = None) -> None:
        """``link`` failed to open, or is gone (EOF: ``error`` None; our own close completing)."""
        if not self._current(link):
            return
        conn_id = link.conn_id
        del self._links[conn_id]
        self._feed(lambda now: self._core.receive(
            TransportClosed(conn_id=conn_id, now=now, wall_time=self._wall(), error=error)))

    def _timer_fired(self) -> None:
        """The one timer went off. Early by at most ``EARLY_WAKE_SLACK``: tick at the deadline
        it was armed for; earlier than that it was moved since (re-armed later): re-arm."""
        armed = self._armed
        self._armed = None
        if self.failure is not None:
            return
        at = tick_time(self._clock(), armed)
        if at is None:
            self._rearm()
            return
        self._feed(lambda _now: self._core.tick(at))

    def _deliver(self, actions: list[ClientAction]) -> None:
        """Transport actions in order, then the connections with output, the timer, and then
        what the notifications ask for (docs/client.md: callbacks come after the batch)."""
        notes: list[ClientAction] = []
        links = self._links
        for action in actions:
            if isinstance(action, OpenConnection):
                links[action.conn_id] = self._connect(action)
            elif isinstance(action, AbortTransport):
                if (link := links.pop(action.conn_id, None)) is not None:
                    self._disconnect(link)
            else:
                notes.append(action)
        for conn_id in self._core.take_ready():
            if (link := links.get(conn_id)) is not None:
                self._output_ready(link)
        self._rearm()
        for note in notes:
            self._notify(note)
        if self._core.finished:
            self._done.set()

    def _rearm(self) -> None:
        deadline = None if self.failure is not None else self._core.next_deadline()
        if deadline != self._armed:
            self._armed = deadline
            self._arm(deadline)

    def _fail(self, exc: BaseException) -> None:
        """The poison rule: a bug in the core closes the client for good."""
        if self.failure is not None:
            return
        self.failure = exc
        logger.error("tank client failed; closing it", exc_info=exc)
        links, self._links = self._links, {}
        for link in links.values():
            self._disconnect(link)
        self._armed = None
        self._arm(None)
        self._end_everything()
        self._done.set()

    def _end_everything(self) -> None:
        self._streams.end_all()
        self._settled.set()
        self._closed.set()

    # ------------------------------------------------------------------ notifications, callbacks

    def _notify(self, note: ClientAction) -> None:
        """Carry out what ``client_dispatch`` routes ``note`` to, in its order."""
        routing = self._dispatcher.route(note)
        if routing.log is not None:
            logger.log(routing.log.level, routing.log.message, *routing.log.args)
        if routing.opened:
            self._settled.set()
        if routing.final:
            self._end_everything()
        for step in routing.steps:
            if isinstance(step, Call):
                self._call(step.fn, *step.args)
            else:
                self._streams.deliver(step.message)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Call a plain callback now; spawn what it returns if that is awaitable; log what they
        raise."""
        try:
            result = fn(*args)
        except Exception:
            logger.exception("tank client: callback %s raised", callable_name(fn))
            return
        if inspect.isawaitable(result):
            job = CallbackJob(fn, result, self._job_done)
            self._jobs.add(job)
            if self._jobs_stopped:
                job.discard()
            else:
                self._spawn(job)

    def _job_done(self, job: CallbackJob) -> None:
        job.done = True
        self._jobs.discard(job)
        changed = self._jobs_changed
        if changed is not None:
            self._jobs_changed = None
            changed.set()

    async def _finish_callbacks(self) -> None:
        """Give callback jobs (but the one calling, if any) ``CALLBACK_GRACE``, then cancel them."""
        me = _CURRENT_JOB.get()

        def others() -> list[CallbackJob]:
            return [job for job in self._jobs if job is not me]

        give_up = self._clock() + CALLBACK_GRACE
        while others():
            changed = self._jobs_changed = self._flag()
            left = give_up - self._clock()
            if left <= 0 or not await self._wait(changed, left):
                break
        stuck = others()
        if stuck:
            self._stop_callbacks(stuck)
        await self._checkpoint_out()

    def _stop_callbacks(self, jobs: list[CallbackJob] | None = None) -> None:
        """Cancel running callback jobs, discard queued ones; later ones are discarded too."""
        self._jobs_stopped = True
        for job in list(self._jobs) if jobs is None else jobs:
            if job.cancel is None:
                job.discard()
            elif not job.cancelled:
                logger.warning("callback task %s still running at close: cancelling it", job.name)
                job.cancelled = True
                job.cancel()
