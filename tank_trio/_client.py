"""The trio client: the sans-IO ``TankClient`` over trio streams, one connection at a time.

A byte pump (DESIGN.md §1). Every decision (handshake, heartbeat, liveness, backoff, resubscribing,
the send queue while disconnected) is the core's; this module opens the connections the core asks
for, feeds it bytes and losses, runs **one** timer task asleep in a ``CancelScope`` whose deadline
is ``next_deadline()``, and calls the application's callbacks after the writes of the batch that
produced them. docs/client.md is the contract (shared with tank_asyncio). Which callbacks and
streams a notification reaches is ``tank_core.client_dispatch``; the streams' bookkeeping is
``tank_core.client_streams``.

``async with tank_trio.connect(url, ...) as client:`` opens the client's own nursery. In it:

- one **link task** per connection (``trio.open_tcp_stream`` / ``trio.open_ssl_over_tcp_stream``),
  running that connection's **reader** and its **writer**, the only caller of ``send_all``;
- the **timer** task;
- the **callback starter**, which starts asynchronous callbacks as tasks, in call order.

These tasks run behind their own shielded cancel scopes: a cancellation of the block still gets the
closing handshake (``close()``, bounded by ``close_timeout``), then they are cancelled and the
cancellation goes on. Core calls are synchronous, so carrying out their actions never awaits:
bytes are queued for the writer and the writer woken.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
from trio.lowlevel import Task, current_task

from tank_core import (
    ClientAction,
    ClientConfig,
    ClientState,
    Connect,
    DropTransport,
    LocalProtocolError,
    MessageArrived,
    TankClient,
    Write,
)
from tank_core.client_dispatch import (
    CALLBACK_GRACE,
    Call,
    ClientCallbacks,
    ClientDispatch,
    OnClose,
    OnHeartbeat,
    OnHeartbeatTimeout,
    OnMessage,
    OnReconnect,
    TopicCallback,
)
from tank_core.client_streams import (
    MESSAGES_MAX_QUEUED,
    OVERFLOW_WARNING,
    MessageStreamBase,
    TopicStreams,
    check_max_queued,
)
from tank_core.describe import callable_name as _name
from tank_core.describe import describe_error

__all__ = [
    "MESSAGES_MAX_QUEUED",
    "Client",
    "MessageStream",
    "OnClose",
    "OnHeartbeat",
    "OnHeartbeatTimeout",
    "OnMessage",
    "OnReconnect",
    "TopicCallback",
    "connect",
]

logger = logging.getLogger("tank")

#: Seconds ``close()`` lets a connection flush our last frames before aborting it.
FLUSH_WAIT = 2.0
#: ``send()`` waits while more than this many bytes wait for the writer (asyncio's default
#: transport high-water mark).
WRITE_HIGH_WATER = 65536
_RECEIVE_SIZE = 65536
#: trio never wakes a deadline early; this only keeps a re-armed (later) deadline from being
#: mistaken for the one that fired (the early-wake guard of DESIGN.md §2).
_EARLY_WAKE_SLACK = 0.001


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the error behind ``exc``: trio wraps socket and TLS errors (a
    ``BrokenResourceError`` caused by an ``SSLError``; ``open_tcp_stream``'s ``OSError`` caused by
    a group of one error per address tried)."""
    cause = exc.__cause__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    elif isinstance(cause, BaseExceptionGroup) and type(exc) is OSError:
        leaves = cause.exceptions
        if len(leaves) == 1 or all(str(leaf) == str(leaves[0]) for leaf in leaves):
            exc = leaves[0]
    return describe_error(exc)


class _Link:
    """One connection (or attempt): its stream, its outbox, the scope that ends all of it."""

    __slots__ = ("buffered", "closing", "dead", "done", "outbox", "room", "scope", "stream", "wakeup")

    def __init__(self) -> None:
        #: Shielded: only the client ends a link (abort, teardown), never an outer cancellation.
        self.scope = trio.CancelScope(shield=True)
        self.stream: trio.abc.Stream | None = None
        #: Bytes for the writer, in order.
        self.outbox: list[bytes] = []
        self.buffered = 0
        #: Close the stream once the outbox is written (a graceful ``DropTransport``).
        self.closing = False
        #: The link task has ended (or is ending): nothing more is written.
        self.dead = False
        #: Set when the writer waits for work.
        self.wakeup: trio.Event | None = None
        #: Set for ``send()`` callers waiting for the outbox to drain.
        self.room: trio.Event | None = None
        self.done = trio.Event()

    def write(self, data: bytes) -> None:
        if self.dead:
            return
        self.outbox.append(data)
        self.buffered += len(data)
        self.wake()

    def wake(self) -> None:
        event = self.wakeup
        if event is not None:
            self.wakeup = None
            event.set()

    def release(self) -> None:
        """Let ``send()`` callers go on (the outbox drained, or the link is gone)."""
        event = self.room
        if event is not None:
            self.room = None
            event.set()


class MessageStream(MessageStreamBase):
    """``async for message in client.messages(topic)``: the messages of one topic, in order.

    Backed by a bounded trio memory channel: when ``max_queued`` messages wait unread, further
    ones are dropped for this stream (counted in ``dropped``, a warning on logger ``tank``); the
    client and the other consumers are unaffected. The stream ends when the topic is unsubscribed,
    the client closes for good, or ``aclose()`` is called; messages already queued are still
    delivered first (except after ``aclose()``).
    """

    def __init__(self, client: Client, topic: str, max_queued: int) -> None:
        super().__init__(topic, max_queued)
        self._client = client
        self._send, self._receive = trio.open_memory_channel[MessageArrived](max_queued)

    async def __anext__(self) -> MessageArrived:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Stop receiving (the topic stays subscribed); queued messages are discarded."""
        self._end()
        self._receive.close()
        self._client._streams.discard(self)
        await trio.lowlevel.checkpoint()

    def _put(self, message: MessageArrived) -> None:
        if self._ended:
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            if self._dropping():
                logger.warning(OVERFLOW_WARNING, self.topic, self.max_queued)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        self._accepting()

    def _end(self) -> None:
        super()._end()
        self._send.close()


class Client:
    """A connected Tank client; get one from ``async with tank_trio.connect(...) as client``."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        on_message: OnMessage | None = None,
        on_heartbeat: OnHeartbeat | None = None,
        on_heartbeat_timeout: OnHeartbeatTimeout | None = None,
        on_reconnect: OnReconnect | None = None,
        on_close: OnClose | None = None,
        ssl_context: ssl_module.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._core = TankClient(config)
        #: Which callbacks each notification calls; the last error; whether any connection opened.
        self._dispatcher = ClientDispatch(
            config.url,
            ClientCallbacks(
                on_message=on_message,
                on_heartbeat=on_heartbeat,
                on_heartbeat_timeout=on_heartbeat_timeout,
                on_reconnect=on_reconnect,
                on_close=on_close,
            ),
        )
        self._ssl_context = ssl_context
        self._nursery: trio.Nursery | None = None
        #: The connection the core is talking to (None between connections).
        self._link: _Link | None = None
        #: Every link whose task still runs (the current one, and ones flushing a last frame).
        self._links: set[_Link] = set()
        #: The shielded scopes of the timer and the callback starter (cancelled on teardown).
        self._service_scopes: list[trio.CancelScope] = []
        self._timer_scope: trio.CancelScope | None = None
        self._armed = math.inf
        self._streams = TopicStreams()
        send, receive = trio.open_memory_channel[tuple[object, Awaitable[object]]](math.inf)
        self._callback_send = send
        self._callback_receive = receive
        #: Asynchronous callbacks queued or running, and the scopes of the running ones.
        self._callbacks_pending = 0
        self._callback_scopes: dict[Task, trio.CancelScope] = {}
        self._callbacks_changed = trio.Event()
        self._cancel_callbacks = False
        self._started = False
        self._failure: BaseException | None = None
        self._settled = trio.Event()
        self._closed = trio.Event()

    # ------------------------------------------------------------------ public API

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
        return self._failure is None and self._core.state is ClientState.OPEN

    @property
    def closed(self) -> bool:
        """True once the client is closed for good (no reconnect follows)."""
        return self._closed.is_set()

    async def subscribe(self, topic: str, callback: TopicCallback | None = None) -> None:
        """Hold ``topic`` (``sub:`` now if open, and after every reconnect); ``callback(data,
        message)`` is called once per message of it. A non-None callback replaces the topic's
        previous one; None keeps it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_started()
        self._command(lambda now: self._core.subscribe(topic, now=now))
        self._dispatcher.subscribed(topic, callback)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def unsubscribe(self, topic: str) -> None:
        """Stop holding ``topic``: ``unsub:`` if open; its callback is forgotten, its streams end."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_started()
        self._command(lambda now: self._core.unsubscribe(topic, now=now))
        self._dispatcher.unsubscribed(topic)
        self._streams.end_topic(topic)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def messages(self, topic: str, *, max_queued: int = MESSAGES_MAX_QUEUED) -> MessageStream:
        """An async iterator over the messages of ``topic`` (held from now on if it was not)."""
        self._check_started()
        check_max_queued(max_queued)
        self._command(lambda now: self._core.subscribe(topic, now=now))
        stream = MessageStream(self, topic, max_queued)
        self._streams.add(stream)
        return stream

    async def send(self, text: str) -> None:
        """Send ``text`` (relayed by the server to every other client). While disconnected it is
        queued (up to ``send_queue_limit``, then ``LocalProtocolError``) and written in order
        after the next open. Waits while the connection's outbox is over 64 KiB."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_started()
        self._command(lambda now: self._core.send(text, now=now))
        link = self._link
        if link is not None and not link.dead and link.buffered > WRITE_HIGH_WATER:
            while link.buffered > WRITE_HIGH_WATER and not link.dead:
                if link.room is None:
                    link.room = trio.Event()
                await link.room.wait()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good (Close frame ``code``/``reason`` if open); no reconnect follows.
        Idempotent. Returns once the closing handshake is over (the server's Close, or
        ``close_timeout``), the connection is gone and asynchronous callbacks have finished."""
        if not self._started:
            await trio.lowlevel.checkpoint()
            return
        if self._core.state is not ClientState.CLOSED and self._failure is None:
            self._command(lambda now: self._core.close(code, reason, now=now))
        # The core ends the closing handshake (the server's Close, or close_timeout). Its deadline
        # is watched here too, so that close() needs no other task to finish.
        while self._core.state is ClientState.CLOSING and self._failure is None:
            deadline = self._core.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._closed.wait()
            if self._core.state is ClientState.CLOSING and deadline is not None:
                self._feed(functools.partial(self._tick_at_least, deadline))
        await self._finish()

    async def wait_closed(self) -> None:
        """Return once the client is closed for good (``close()``, or a loss with reconnect off)."""
        if not self._started:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        await self._closed.wait()

    @property
    def timer(self) -> trio.CancelScope | None:
        """The scope the one timer task sleeps in, while something is due (None otherwise); its
        ``deadline`` is ``core.next_deadline()``. For tests."""
        scope = self._timer_scope
        if scope is None or scope.deadline == math.inf:
            return None
        return scope

    @property
    def core(self) -> TankClient:
        """The sans-IO client underneath (for tests and tools; do not drive it directly)."""
        return self._core

    # ------------------------------------------------------------------ lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        """Begin connecting in ``nursery`` (``connect`` calls it; then ``_wait_open``)."""
        if self._started:
            raise LocalProtocolError("this client was already started")
        self._nursery = nursery
        self._started = True
        await nursery.start(self._timer, name="tank client timer")
        await nursery.start(self._callback_starter, name="tank client callbacks")
        self._command(lambda now: self._core.start(now=now))

    async def _wait_open(self) -> None:
        """Return once the first connection opened; else the error docs/client.md names."""
        config = self.config
        if config.reconnect:
            with trio.move_on_after(config.connect_timeout):
                await self._settled.wait()
            if not self._settled.is_set():
                raise self._dispatcher.no_connection(config.connect_timeout)
        else:
            await self._settled.wait()
        if self._failure is not None:
            raise self._failure
        if not self._dispatcher.opened_once:
            raise self._dispatcher.cannot_connect()

    async def _finish(self) -> None:
        """Let the connections flush their last frames, then let async callbacks finish."""
        if self._links:
            with trio.move_on_after(FLUSH_WAIT):
                for link in list(self._links):
                    await link.done.wait()
            for link in list(self._links):
                link.scope.cancel()
        me = current_task()

        def others() -> int:
            return self._callbacks_pending - (1 if me in self._callback_scopes else 0)

        if others() > 0:
            with trio.move_on_after(CALLBACK_GRACE):
                while others() > 0:
                    await self._callbacks_changed.wait()
            if others() > 0:
                self._cancel_callbacks = True
                for task, scope in list(self._callback_scopes.items()):
                    if task is not me:
                        logger.warning("callback task %s still running at close: cancelling it",
                                       task.name)
                        scope.cancel()
        await trio.lowlevel.checkpoint()

    def _teardown(self) -> None:
        """Leaving the block: end every task of the client (after ``close()``)."""
        for link in list(self._links):
            link.scope.cancel()
        for scope in self._service_scopes:
            scope.cancel()
        self._cancel_callbacks = True
        for scope in self._callback_scopes.values():
            scope.cancel()
        self._callback_send.close()

    def _check_started(self) -> None:
        if not self._started:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        if self._failure is not None:
            raise LocalProtocolError("the client failed (see the logged error); create a new one")

    def _command(self, call: Callable[[float], list[ClientAction]]) -> None:
        """An application call into the core: its misuse (LocalProtocolError) is the caller's;
        anything else is a bug in the core, which is then poisoned."""
        try:
            actions = call(trio.current_time())
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        self._dispatch(actions)

    def _feed(self, call: Callable[[float], list[ClientAction]]) -> None:
        """A transport or timer event into the core; a failure poisons it."""
        if self._failure is not None:
            return
        try:
            actions = call(trio.current_time())
        except Exception as exc:
            self._fail(exc)
            return
        self._dispatch(actions)

    def _fail(self, exc: BaseException) -> None:
        """A bug in the core (it is poisoned): drop the connection and stop for good."""
        if self._failure is not None:
            return
        self._failure = exc
        logger.error("tank client failed; closing it", exc_info=exc)
        self._drop(abort=True)
        self._armed = math.inf
        if self._timer_scope is not None:
            self._timer_scope.deadline = math.inf
        self._end_everything()

    def _end_everything(self) -> None:
        self._streams.end_all()
        self._settled.set()
        self._closed.set()

    # ------------------------------------------------------------------ transport

    def _connect(self, action: Connect) -> None:
        self._drop(abort=True)  # the core never asks while one is up; be safe anyway
        nursery = self._nursery
        assert nursery is not None
        link = _Link()
        self._link = link
        self._links.add(link)
        # The connection's task: it opens the stream, then is its writer (and runs its reader).
        name = f"tank client writer {action.host}:{action.port}"
        nursery.start_soon(self._run_link, link, action, name=name)

    def _drop(self, *, abort: bool) -> None:
        """``DropTransport``: forget the current link; abort it, or close it once flushed."""
        link = self._link
        self._link = None
        if link is None:
            return
        if abort or link.stream is None:
            link.dead = True
            link.scope.cancel()
            link.release()
        else:
            link.closing = True  # the writer flushes (our Close frame included), then closes
            link.wake()

    async def _open_stream(self, action: Connect) -> trio.abc.Stream:
        if not action.secure:
            return await trio.open_tcp_stream(action.host, action.port)
        context = self._ssl_context or ssl_module.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(action.host, action.port, ssl_context=context)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _run_link(self, link: _Link, action: Connect) -> None:
        """One connection: open it, then run its reader and its writer until it ends."""
        try:
            with link.scope:
                try:
                    stream = await self._open_stream(action)
                except Exception as exc:  # refused, unreachable, TLS: the attempt failed
                    if link is self._link:
                        self._link = None
                        error = _describe(exc)
                        self._feed(lambda now: self._core.transport_lost(now=now, error=error))
                    return
                link.stream = stream
                try:
                    if link is not self._link or link.dead:
                        return  # an attempt the core already gave up on
                    self._feed(lambda now: self._core.transport_opened(now=now))
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reader, link, name="tank client reader")
                        await self._writer(link)
                        nursery.cancel_scope.cancel()
                    if link.closing:
                        with trio.move_on_after(FLUSH_WAIT):
                            await stream.aclose()  # (TLS: close_notify)
                finally:
                    link.dead = True
                    await trio.aclose_forcefully(stream)
        finally:
            link.dead = True
            link.release()
            self._links.discard(link)
            link.done.set()

    async def _reader(self, link: _Link) -> None:
        stream = link.stream
        assert stream is not None
        error = "connection closed by the server"
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                if link is self._link:
                    self._feed(functools.partial(self._received, bytes(data)))
                # else: a link we dropped gracefully; what it still reads does not matter
        except trio.ClosedResourceError:
            return  # we closed it
        except Exception as exc:  # reset, TLS error...: the connection is lost, the client goes on
            error = _describe(exc)
        self._link_lost(link, error)

    def _received(self, data: bytes, now: float) -> list[ClientAction]:
        return self._core.data_received(data, now=now)

    async def _writer(self, link: _Link) -> None:
        """The only code that writes to the link's stream. Returns when the link is dropped
        gracefully and flushed, or is lost."""
        stream = link.stream
        assert stream is not None
        try:
            while not link.dead:
                if link.outbox:
                    chunks = link.outbox
                    link.outbox = []
                    buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    await stream.send_all(buf)
                    link.buffered -= len(buf)
                    if link.buffered <= WRITE_HIGH_WATER:
                        link.release()
                elif link.closing:
                    return
                else:
                    event = link.wakeup = trio.Event()
                    await event.wait()
        except trio.ClosedResourceError:
            return  # we closed it
        except Exception as exc:  # reset, broken pipe, TLS error...
            self._link_lost(link, _describe(exc))

    def _link_lost(self, link: _Link, error: str) -> None:
        """EOF or an error on a link: the current one is reported to the core; a link being
        dropped gracefully just stops."""
        if link is self._link:
            self._link = None
            link.dead = True
            link.scope.cancel()
            link.release()
            self._feed(lambda now: self._core.transport_lost(now=now, error=error))
        else:
            link.closing = True
            link.wake()

    # ------------------------------------------------------------------ actions

    def _dispatch(self, actions: list[ClientAction]) -> None:
        """Carry out the transport actions in order, then call back for the notifications."""
        notes: list[ClientAction] = []
        for action in actions:
            kind = type(action)
            if kind is Write:
                assert isinstance(action, Write)
                link = self._link
                if link is not None:
                    link.write(action.data)
            elif kind is Connect:
                assert isinstance(action, Connect)
                self._connect(action)
            elif kind is DropTransport:
                assert isinstance(action, DropTransport)
                self._drop(abort=action.abort)
            else:
                notes.append(action)
        self._rearm()
        for note in notes:
            self._notify(note)

    def _notify(self, note: ClientAction) -> None:
        """Carry out what ``tank_core.client_dispatch`` routes ``note`` to, in its order."""
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

    # ------------------------------------------------------------------ callbacks

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Call a plain callback now; hand an awaitable it returns to the callback starter (a
        task per call, started in call order). Log what they raise."""
        try:
            result = fn(*args)
        except Exception:
            logger.exception("tank client: callback %s raised", _name(fn))
            return
        if inspect.isawaitable(result):
            try:
                self._callback_send.send_nowait((fn, result))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                _discard(result)  # the client is gone
                return
            self._callbacks_pending += 1

    async def _callback_starter(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Starts each asynchronous callback as its own task, one after the other."""
        nursery = self._nursery
        assert nursery is not None
        with trio.CancelScope(shield=True) as scope:
            self._service_scopes.append(scope)
            task_status.started()
            async for fn, awaitable in self._callback_receive:
                if self._cancel_callbacks:
                    _discard(awaitable)
                    self._callback_finished()
                    continue
                await nursery.start(self._run_callback, fn, awaitable, name=_name(fn))
        # Teardown: whatever was never started is discarded.
        while True:
            try:
                _fn, awaitable = self._callback_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            _discard(awaitable)
            self._callback_finished()

    async def _run_callback(
        self,
        fn: object,
        awaitable: Awaitable[object],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        me = current_task()
        scope = trio.CancelScope(shield=True)  # cancelled by close() after CALLBACK_GRACE
        self._callback_scopes[me] = scope
        try:
            with scope:
                task_status.started()
                try:
                    await awaitable
                except Exception:
                    logger.exception("tank client: callback %s raised", _name(fn))
        finally:
            del self._callback_scopes[me]
            self._callback_finished()

    def _callback_finished(self) -> None:
        self._callbacks_pending -= 1
        event = self._callbacks_changed
        self._callbacks_changed = trio.Event()
        event.set()

    # ------------------------------------------------------------------ the one timer

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        when = math.inf if deadline is None or self._failure is not None else deadline
        if when != self._armed:
            self._armed = when
            scope = self._timer_scope
            if scope is not None:
                scope.deadline = when

    async def _timer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one timer of the client: sleeps until ``next_deadline()``, ticks, loops."""
        with trio.CancelScope(shield=True) as outer:
            self._service_scopes.append(outer)
            task_status.started()
            while True:
                with trio.CancelScope(deadline=self._armed) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                if self._failure is not None:
                    self._armed = math.inf
                    continue
                now = trio.current_time()
                fired = scope.deadline
                if fired <= now + _EARLY_WAKE_SLACK:
                    now = max(now, fired)  # DESIGN.md §2: tick(max(clock, armed))
                self._armed = math.inf  # the wake-up consumed it; _rearm sets the next one
                self._feed(functools.partial(self._tick, now))
                self._rearm()

    def _tick(self, at: float, _now: float) -> list[ClientAction]:
        return self._core.tick(at)

    def _tick_at_least(self, at: float, now: float) -> list[ClientAction]:
        return self._core.tick(max(now, at))


def _discard(awaitable: Awaitable[object]) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning


@asynccontextmanager
async def _session(client: Client) -> AsyncIterator[Client]:
    # Exceptions of the body (and of entering) are held while the nursery closes and raised after
    # it, unchanged: never wrapped in an ExceptionGroup. The client's tasks never raise.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await client._start(nursery)
            await client._wait_open()
        except BaseException as exc:
            error = exc
        if error is None:
            try:
                yield client
            except BaseException as exc:
                error = exc
        try:
            with trio.CancelScope(shield=True):
                await client.close()
        except BaseException as exc:  # a failure of the core while closing (also client._failure)
            if error is None:
                error = exc
        finally:
            client._teardown()
    if error is not None:
        try:
            raise error
        finally:
            error = None  # no reference cycle through the traceback
    if client._failure is not None:
        raise client._failure


def connect(
    url: str,
    user_id: str | None = None,
    token: str | None = None,
    heartbeat: bool = True,
    heartbeat_interval: float = 5.0,
    heartbeat_timeout: float = 15.0,
    reconnect: bool = True,
    *,
    on_message: OnMessage | None = None,
    on_heartbeat: OnHeartbeat | None = None,
    on_heartbeat_timeout: OnHeartbeatTimeout | None = None,
    on_reconnect: OnReconnect | None = None,
    on_close: OnClose | None = None,
    reconnect_initial_delay: float = 0.5,
    reconnect_max_delay: float = 30.0,
    connect_timeout: float = 10.0,
    send_queue_limit: int = 1000,
    max_message_size: int = 16 * 1_048_576,
    ssl_context: ssl_module.SSLContext | None = None,
) -> AbstractAsyncContextManager[Client]:
    """``async with tank_trio.connect(url, ...) as client:``: entering waits for the first open;
    leaving closes the client for good. The settings are validated here, at the call
    (``tank_core.ConfigError``). Parameters and callbacks: docs/client.md."""
    config = ClientConfig(
        url=url,
        user_id=user_id,
        token=token,
        heartbeat=heartbeat,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        reconnect=reconnect,
        reconnect_initial_delay=reconnect_initial_delay,
        reconnect_max_delay=reconnect_max_delay,
        connect_timeout=connect_timeout,
        send_queue_limit=send_queue_limit,
        max_message_size=max_message_size,
    )
    client = Client(
        config,
        on_message=on_message,
        on_heartbeat=on_heartbeat,
        on_heartbeat_timeout=on_heartbeat_timeout,
        on_reconnect=on_reconnect,
        on_close=on_close,
        ssl_context=ssl_context,
    )
    return _session(client)
