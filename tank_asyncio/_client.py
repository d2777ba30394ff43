"""The asyncio client: the sans-IO ``TankClient`` over one asyncio ``Protocol`` at a time.

A byte pump (DESIGN.md §1). Every decision (handshake, heartbeat, liveness, backoff, resubscribing,
the send queue while disconnected) is the core's; this module opens the connections the core asks
for, feeds it bytes and losses, runs **one** timer (``_clock.py``) armed for ``next_deadline()``,
and calls the application's callbacks after the writes of the batch that produced them.
docs/client.md is the contract (shared with tank_trio). Which callbacks and streams a notification
reaches is ``tank_core.client_dispatch``; the streams' bookkeeping is ``tank_core.client_streams``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl as ssl_module
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import cast

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
from tank_core.describe import describe_error as _describe

from . import _clock

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

#: Seconds ``close()`` lets the transport flush our Close frame before aborting it.
FLUSH_WAIT = 2.0


class _ClientProtocol(asyncio.Protocol):
    """One TCP (or TLS) connection; it only forwards to its ``Client``, which checks it is current."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.lost: asyncio.Future[None] = client._loop.create_future()
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client._transport_opened(self)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_writers()
        self.client._transport_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter = self._writable
        self._writable = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def writable(self) -> None:
        """Return once the transport takes more bytes (or is gone)."""
        while self.paused and not self.lost.done():
            if self._writable is None:
                self._writable = self.client._loop.create_future()
            await asyncio.shield(self._writable)


class MessageStream(MessageStreamBase):
    """``async for message in client.messages(topic)``: the messages of one topic, in order.

    Bounded: when ``max_queued`` messages wait unread, further ones are dropped for this stream
    (counted in ``dropped``, a warning on logger ``tank``); the client and the other consumers
    are unaffected. The stream ends when the topic is unsubscribed, the client closes for good,
    or ``aclose()`` is called; messages already queued are still delivered first.
    """

    def __init__(self, client: Client, topic: str, max_queued: int) -> None:
        super().__init__(topic, max_queued)
        self._client = client
        self._queue: deque[MessageArrived] = deque()
        self._waiter: asyncio.Future[None] | None = None

    async def __anext__(self) -> MessageArrived:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            waiter = self._client._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._queue.popleft()

    async def aclose(self) -> None:
        """Stop receiving (the topic stays subscribed); queued messages are discarded."""
        self._end()
        self._queue.clear()
        self._client._streams.discard(self)

    def _put(self, message: MessageArrived) -> None:
        if self._ended:
            return
        if len(self._queue) >= self.max_queued:
            if self._dropping():
                logger.warning(OVERFLOW_WARNING, self.topic, self.max_queued)
            return
        self._accepting()
        self._queue.append(message)
        self._wake()

    def _end(self) -> None:
        super()._end()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Client:
    """A connected Tank client; get one from ``async with tank_asyncio.connect(...) as client``."""

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
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        #: The connection the core is talking to (None between connections).
        self._proto: _ClientProtocol | None = None
        #: The task opening ``_proto``, while it runs.
        self._opening: asyncio.Task[None] | None = None
        #: The last connection we dropped with a graceful close (close() lets it flush).
        self._draining: _ClientProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._streams = TopicStreams()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._failure: BaseException | None = None
        self._settled: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def user_id(self) -> str | None:
        """The ``user_id`` given to ``connect``, else the one the server's Hello named; None before."""
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
        return self._closed is not None and self._closed.is_set()

    async def subscribe(self, topic: str, callback: TopicCallback | None = None) -> None:
        """Hold ``topic`` (``sub:`` now if open, and after every reconnect); ``callback(data,
        message)`` is called once per message of it. A non-None callback replaces the topic's
        previous one; None keeps it."""
        self._check_started()
        self._command(lambda now: self._core.subscribe(topic, now=now))
        self._dispatcher.subscribed(topic, callback)

    async def unsubscribe(self, topic: str) -> None:
        """Stop holding ``topic``: ``unsub:`` if open; its callback is forgotten, its streams end."""
        self._check_started()
        self._command(lambda now: self._core.unsubscribe(topic, now=now))
        self._dispatcher.unsubscribed(topic)
        self._streams.end_topic(topic)

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
        after the next open. Waits while the transport's buffer is full."""
        self._check_started()
        self._command(lambda now: self._core.send(text, now=now))
        proto = self._proto
        if proto is not None and proto.paused:
            await proto.writable()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good (Close frame ``code``/``reason`` if open); no reconnect follows.
        Idempotent. Returns once the transport is gone and pending callbacks have run."""
        if not self._started:
            return
        if self._core.state is not ClientState.CLOSED and self._failure is None:
            self._command(lambda now: self._core.close(code, reason, now=now))
        if self._core.state is ClientState.CLOSING and self._closed is not None:
            # The core ends the closing handshake: the server's Close, or close_timeout.
            await self._closed.wait()
        await self._finish()

    async def wait_closed(self) -> None:
        """Return once the client is closed for good (``close()``, or a loss with reconnect off)."""
        if self._closed is None:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        await self._closed.wait()

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The one timer of this client (None while nothing is due); for tests."""
        return self._timer

    @property
    def core(self) -> TankClient:
        """The sans-IO client underneath (for tests and tools; do not drive it directly)."""
        return self._core

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Begin connecting (``connect`` calls it; then ``wait_open``)."""
        if self._started:
            raise LocalProtocolError("this client was already started")
        self._loop = asyncio.get_running_loop()
        self._settled = asyncio.Event()
        self._closed = asyncio.Event()
        self._started = True
        self._command(lambda now: self._core.start(now=now))

    async def wait_open(self) -> None:
        """Return once the first connection opened; ConnectionError if the client closed first."""
        assert self._settled is not None
        await self._settled.wait()
        if self._failure is not None:
            raise self._failure
        if not self._dispatcher.opened_once:
            raise self._dispatcher.cannot_connect()

    async def _finish(self) -> None:
        draining = self._draining
        self._draining = None
        if draining is not None and not draining.lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(draining.lost), FLUSH_WAIT)
            except TimeoutError:
                if draining.transport is not None:
                    draining.transport.abort()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=CALLBACK_GRACE)
            for task in pending:
                logger.warning("callback task %s still running at close: cancelling it",
                               task.get_name())
                task.cancel()

    def _check_started(self) -> None:
        if not self._started:
            raise LocalProtocolError("the client is not running: use `async with connect(...)`")
        if self._failure is not None:
            raise LocalProtocolError("the client failed (see the logged error); create a new one")

    def _command(self, call: Callable[[float], list[ClientAction]]) -> None:
        """An application call into the core: its misuse (LocalProtocolError) is the caller's;
        anything else is a bug in the core, which is then poisoned."""
        try:
            actions = call(_clock.now())
        except LocalProtocolError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        self._dispatch(actions)

    def _fail(self, exc: BaseException) -> None:
        """A bug in the core (it is poisoned): drop the connection and stop for good."""
        if self._failure is not None:
            return
        self._failure = exc
        logger.error("tank client failed; closing it", exc_info=exc)
        self._drop(abort=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end_everything()

    def _end_everything(self) -> None:
        self._streams.end_all()
        assert self._settled is not None and self._closed is not None
        self._settled.set()
        self._closed.set()

    # ------------------------------------------------------------------ transport

    def _connect(self, action: Connect) -> None:
        self._drop(abort=True)  # the core never asks while one is up; be safe anyway
        proto = _ClientProtocol(self)
        self._proto = proto
        context: ssl_module.SSLContext | None = None
        if action.secure:
            context = self._ssl_context or ssl_module.create_default_context()
        self._opening = self._loop.create_task(
            self._open(proto, action, context), name=f"tank-connect-{action.host}:{action.port}"
        )

    async def _open(
        self, proto: _ClientProtocol, action: Connect, context: ssl_module.SSLContext | None
    ) -> None:
        try:
            await self._loop.create_connection(
                lambda: proto,
                action.host,
                action.port,
                ssl=context,
                server_hostname=action.host if context is not None else None,
            )
        except Exception as exc:  # (a cancellation means the core gave up on this attempt)
            if proto is self._proto:
                self._proto = None
                error = _describe(exc)
                self._feed(lambda now: self._core.transport_lost(now=now, error=error))
        finally:
            if self._opening is asyncio.current_task():
                self._opening = None

    def _transport_opened(self, proto: _ClientProtocol) -> None:
        if proto is not self._proto or self._failure is not None:
            assert proto.transport is not None
            proto.transport.abort()  # an attempt the core already gave up on
            return
        self._feed(lambda now: self._core.transport_opened(now=now))

    def _data_received(self, proto: _ClientProtocol, data: bytes) -> None:
        if proto is self._proto:
            self._feed(lambda now: self._core.data_received(data, now=now))

    def _transport_lost(self, proto: _ClientProtocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        error = _describe(exc) if exc is not None else "connection closed by the server"
        self._feed(lambda now: self._core.transport_lost(now=now, error=error))

    def _feed(self, call: Callable[[float], list[ClientAction]]) -> None:
        if self._failure is not None:
            return
        try:
            actions = call(_clock.now())
        except Exception as exc:
            self._fail(exc)
            return
        self._dispatch(actions)

    def _drop(self, *, abort: bool) -> None:
        proto = self._proto
        self._proto = None
        opening = self._opening
        self._opening = None
        if opening is not None and not opening.done():
            opening.cancel()
        if proto is None or proto.transport is None:
            return
        if abort:
            proto.transport.abort()
        else:
            proto.transport.close()  # after what is buffered, our Close frame included
            self._draining = proto

    # ------------------------------------------------------------------ actions

    def _dispatch(self, actions: list[ClientAction]) -> None:
        """Carry out the transport actions in order, then call back for the notifications."""
        notes: list[ClientAction] = []
        for action in actions:
            kind = type(action)
            if kind is Write:
                assert isinstance(action, Write)
                proto = self._proto
                if proto is not None and proto.transport is not None:
                    proto.transport.write(action.data)
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
            assert self._settled is not None
            self._settled.set()
        if routing.final:
            self._end_everything()
        for step in routing.steps:
            if isinstance(step, Call):
                self._call(step.fn, *step.args)
            else:
                self._streams.deliver(step.message)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Call a plain callback now, schedule a coroutine one as a task; log what they raise."""
        try:
            result = fn(*args)
        except Exception:
            logger.exception("tank client: callback %s raised", _name(fn))
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._await_callback(fn, result), name=_name(fn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _await_callback(self, fn: object, awaitable: Awaitable[object]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("tank client: callback %s raised", _name(fn))

    # ------------------------------------------------------------------ the one timer

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        if deadline == self._armed and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None and self._failure is None:
            self._timer = _clock.arm(self._loop, deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        armed = self._armed
        self._armed = None
        now = _clock.now()
        if armed is not None and now < armed:
            self._rearm()  # early (rare, thanks to TIMER_SLACK): never tick with a forged clock
            return
        self._feed(lambda _now: self._core.tick(now))
        self._rearm()


class connect:
    """``async with tank_asyncio.connect(url, ...) as client:``: entering waits for the first open;
    leaving closes the client for good. Parameters and callbacks: docs/client.md."""

    def __init__(
        self,
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
    ) -> None:
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
        self.client = Client(
            config,
            on_message=on_message,
            on_heartbeat=on_heartbeat,
            on_heartbeat_timeout=on_heartbeat_timeout,
            on_reconnect=on_reconnect,
            on_close=on_close,
            ssl_context=ssl_context,
        )

    async def __aenter__(self) -> Client:
        client = self.client
        config = client.config
        await client.start()
        try:
            if config.reconnect:
                try:
                    async with asyncio.timeout(config.connect_timeout):
                        await client.wait_open()
                except TimeoutError:
                    raise client._dispatcher.no_connection(config.connect_timeout) from None
            else:
                await client.wait_open()
        except BaseException:
            await client.close()
            raise
        return client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self.client
        await client.close()
        if client._failure is not None and exc is None:
            raise client._failure
