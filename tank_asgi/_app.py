"""``TankASGI``: the Tank server as one ASGI application, on anyio (asyncio and trio alike).

A ``tank_core.ServerSession`` whose transport is the ASGI server: it owns the sockets and the
WebSocket framing and hands over messages, so each connection is accepted with ``messages=True``
and driven at the message level (``MessageArrived``, ``CloseArrived``, ``messages_to_send``). The
opening handshake and the HTTP API go through the core's HTTP layer (``_scope.py``), so every rule
is the core's. This module only moves messages: per connection a reader and a writer, one timer,
one task running coroutine hooks, and the Redis links of a cluster node over anyio streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from tank_core import ServerConfig, ServerSession
from tank_core.actions import (
    AbortTransport,
    AuthorizeUpgrade,
    OpenConnection,
    PauseReading,
    ResumeReading,
    UpgradeRequest,
)
from tank_core.errors import LocalProtocolError
from tank_core.events import (
    BytesReceived,
    CloseArrived,
    ConnectionOpened,
    MessageArrived,
    TransportClosed,
)
from tank_core.server.message_output import (
    AcceptWebSocket,
    HttpAnswer,
    Outgoing,
    OutgoingClose,
    OutgoingText,
)
from tank_core.server.session import HOOK_DRAIN_TIMEOUT

from ._scope import client_host, request_bytes

__all__ = ["AsgiUpgradeRequest", "TankASGI"]

logger = logging.getLogger("tank")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: ASGI's "abnormal closure": the peer went without a Close (RFC 6455 §7.4.1: 1006).
_ABNORMAL = 1006
_NO_STATUS = 1005


@dataclass(frozen=True, slots=True, kw_only=True)
class AsgiUpgradeRequest(UpgradeRequest):
    """What ``authenticate`` gets under ASGI: the ``UpgradeRequest`` plus the connection's ASGI
    ``scope``, so the application can reuse its own check (a Starlette ``HTTPConnection(scope)``
    reads cookies and headers; FastAPI's session middleware leaves ``scope["session"]``)."""

    scope: Scope


class _Link:
    """One connection the core knows: an ASGI request or WebSocket, or a Redis link."""

    __slots__ = ("accepted", "asgi", "conn_id", "gone", "paused", "resumed", "scope", "wake")

    def __init__(self, conn_id: int, asgi: Scope | None = None) -> None:
        self.conn_id = conn_id
        self.asgi = asgi  # the ASGI scope of a request or WebSocket
        self.wake = anyio.Event()  # the core has output for it (or it went)
        self.accepted = anyio.Event()  # a WebSocket: accepted, its reader may start
        self.resumed = anyio.Event()
        self.paused = False
        self.gone = False
        self.scope: anyio.CancelScope | None = None


class TankASGI(ServerSession):
    """The Tank server as an ASGI application (docs/how-to/asgi.md).

    ``TankASGI(config, authenticate=..., on_message=..., redis_url=...)`` takes the same hooks and
    settings as ``tank_asyncio.serve``. It runs while its lifespan runs: an ASGI server that runs it
    as the application sends the lifespan itself; mounted in FastAPI or Starlette, pass
    ``lifespan=tank.lifespan`` to the outer application. ``http=True`` also serves the HTTP API,
    ``/tank.js`` and the status page below the mount point. ``close_silent=True`` closes a client
    that sends nothing for ``heartbeat_timeout`` (right when every client sends heartbeats: the
    ASGI server keeps the Pongs that would prove the others alive).
    """

    _clock = staticmethod(time.monotonic)
    _wall = staticmethod(time.time)

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        http: bool = False,
        close_silent: bool = False,
        **hooks: Any,
    ) -> None:
        """``hooks``: ``authenticate``, ``authorize_subscribe``, ``on_connect``,
        ``on_disconnect``, ``on_message``, ``on_error``, ``on_event``, ``hook_queue_size`` and
        ``redis_url``, as ``tank_asyncio.serve`` takes them (docs/embedding.md)."""
        super().__init__(config, **hooks)
        self._core.watch_framed_silence = close_silent
        self._serve_http = http
        self._links: dict[int, _Link] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._deadline: float | None = None
        self._moved = anyio.Event()
        self._hooks_ready = anyio.Event()
        self._turn_pending = False
        self._idle = anyio.Event()
        self._stopped = False
        self._thread = 0  # the event loop's, once running

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        """Between the start and the end of its lifespan."""
        return self._tasks is not None and not self._stopped

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the server for the life of the block: FastAPI's and Starlette's ``lifespan=``.
        Leaving it shuts down gracefully (``Server is shutting down``, Close 1001)."""
        if self._tasks is not None:
            raise LocalProtocolError("this TankASGI is running already")
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._thread = threading.get_ident()
            tasks.start_soon(self._timer)
            tasks.start_soon(self._hook_runner)
            self._start_core()
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tasks.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Graceful: goodbye and Close 1001 to everyone, ``close_timeout`` to finish, then abort."""
        if not self._begin_shutdown():
            return
        with anyio.move_on_after(self._shutdown_grace):
            await self._all_gone()
        self._abort_all()
        with anyio.move_on_after(HOOK_DRAIN_TIMEOUT):
            await self._run_queued_hooks()
        self._drop_queued_hooks()
        self._stopped = True

    async def _all_gone(self) -> None:
        while self._links:
            self._idle = anyio.Event()
            await self._idle.wait()

    def _started(self) -> bool:
        if self._tasks is not None and threading.get_ident() != self._thread:
            raise LocalProtocolError(
                "TankASGI's methods run on its event loop's thread, not in a worker thread: "
                "call them from an async def (a sync FastAPI route runs in a thread) or through "
                "anyio.from_thread.run_sync"
            )
        return self._tasks is not None

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    def _open_link(self, scope: Scope) -> _Link | None:
        if not self.running or self.closing:
            return None
        conn_id = self._accept(client_host(scope), messages=True)
        if conn_id is None:
            return None
        link = self._links[conn_id] = _Link(conn_id, scope)
        return link

    def _close_link(self, link: _Link, error: str | None = None) -> None:
        """The connection is over: the core hears of it (once), shutdown of its end."""
        if self._links.pop(link.conn_id, None) is not None:
            self._event(TransportClosed(conn_id=link.conn_id, now=self._clock(),
                                        wall_time=self._wall(), error=error))
        if not self._links:
            self._idle.set()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive()).get("type") != "websocket.connect":
            return
        link = self._open_link(scope)
        if link is None:
            # Not running (no lifespan), shutting down or failed: 1013, try again later.
            logger.warning("tank ASGI app is not running: is its lifespan run? (refused 1013)")
            await send({"type": "websocket.close", "code": 1013})
            return
        try:
            self._feed(link, request_bytes(scope))
            async with anyio.create_task_group() as tasks:
                link.scope = tasks.cancel_scope
                tasks.start_soon(self._ws_reader, link, receive)
                await self._ws_writer(link, scope, send)
                tasks.cancel_scope.cancel()
        finally:
            self._close_link(link)

    async def _ws_reader(self, link: _Link, receive: Receive) -> None:
        await link.accepted.wait()
        conn_id = link.conn_id
        while True:
            while link.paused:
                await link.resumed.wait()
            message = await receive()
            kind = message.get("type")
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    data, binary = text.encode("utf-8", "surrogatepass"), False
                else:
                    data, binary = bytes(message.get("bytes") or b""), True
                self._event(MessageArrived(conn_id=conn_id, data=data, binary=binary,
                                           now=self._clock(), wall_time=self._wall()))
            elif kind == "websocket.disconnect":
                code = int(message.get("code") or _NO_STATUS)
                now, wall = self._clock(), self._wall()
                if code == _ABNORMAL:
                    self._event(TransportClosed(conn_id=conn_id, now=now, wall_time=wall,
                                                error="connection lost"))
                else:
                    self._event(CloseArrived(
                        conn_id=conn_id, code=None if code == _NO_STATUS else code,
                        reason=str(message.get("reason") or ""), now=now, wall_time=wall))
                link.gone = True
                link.wake.set()
                return

    async def _ws_writer(self, link: _Link, scope: Scope, send: Send) -> None:
        denial = "websocket.http.response" in (scope.get("extensions") or {})
        while True:
            await link.wake.wait()
            link.wake = anyio.Event()
            out = None if link.gone else self._take(link)
            if out is None:
                return
            try:
                for item in out:
                    if not await self._send_ws(link, item, send, denial):
                        return
            except Exception as exc:  # the ASGI server's: the client went while we wrote
                if not link.gone:
                    link.gone = True
                    self._event(TransportClosed(conn_id=link.conn_id, now=self._clock(),
                                                wall_time=self._wall(), error=str(exc) or
                                                type(exc).__name__, write_failed=True))
                return

    async def _send_ws(self, link: _Link, item: Outgoing, send: Send, denial: bool) -> bool:
        """Send one item; False when the connection is finished."""
        if isinstance(item, OutgoingText):
            await send({"type": "websocket.send", "text": item.text})
        elif isinstance(item, AcceptWebSocket):
            accept: Message = {"type": "websocket.accept"}
            if item.subprotocol is not None:
                accept["subprotocol"] = item.subprotocol
            await send(accept)
            link.accepted.set()
        elif isinstance(item, OutgoingClose):
            await send({"type": "websocket.close", "code": item.code or 1000,
                        "reason": item.reason})
        elif isinstance(item, HttpAnswer):
            if denial:  # ASGI's "WebSocket Denial Response" extension
                await send({"type": "websocket.http.response.start", "status": item.status,
                            "headers": list(item.headers)})
                await send({"type": "websocket.http.response.body", "body": item.body})
            else:  # the server answers 403 to a close before the accept
                await send({"type": "websocket.close", "code": 1008})
            return False
        return True

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        link = self._open_link(scope) if self._serve_http else None
        if link is None:
            status, text = (404, b"Not Found\n") if not self._serve_http else (
                503, b"Tank is not running\n")
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": text})
            return
        try:
            body = bytearray()
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    return
                body += message.get("body") or b""
                if not message.get("more_body") or len(body) > self.config.max_request_size:
                    break  # past the size, the core answers 413 from what it has
            self._feed(link, request_bytes(scope, bytes(body)))
            while True:
                await link.wake.wait()
                link.wake = anyio.Event()
                out = self._take(link)
                if out is None:
                    return
                for item in out:
                    if isinstance(item, HttpAnswer):
                        await send({"type": "http.response.start", "status": item.status,
                                    "headers": list(item.headers)})
                        await send({"type": "http.response.body", "body": item.body})
                        return
        finally:
            self._close_link(link)

    def _feed(self, link: _Link, request: bytes) -> None:
        """The request, as the core reads it from a socket."""
        self._event(BytesReceived(conn_id=link.conn_id, data=request, now=self._clock(),
                                  wall_time=self._wall()))

    def _take(self, link: _Link) -> tuple[Outgoing, ...] | None:
        """What the core has for this connection (None: it is finished)."""
        if self.failure is not None:
            return None
        try:
            out = self._core.messages_to_send(link.conn_id)
        except Exception as exc:
            self._fail(exc)
            return None
        if self._core.turn_wanted:
            self._turn_wanted()
        return out

    # ------------------------------------------------------------------ what the session asks

    def _upgrade_request(self, ask: AuthorizeUpgrade) -> object:
        link = self._links.get(ask.conn_id)
        if link is None or link.asgi is None:
            return ask.request
        fields = {f.name: getattr(ask.request, f.name) for f in dataclasses.fields(ask.request)}
        return AsgiUpgradeRequest(**fields, scope=link.asgi)

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        match action:
            case PauseReading(conn_id=conn_id):
                link = self._links.get(conn_id)
                if link is not None and not link.paused:
                    link.paused = True
                    link.resumed = anyio.Event()
            case ResumeReading(conn_id=conn_id):
                link = self._links.get(conn_id)
                if link is not None:
                    link.paused = False
                    link.resumed.set()
            case AbortTransport(conn_id=conn_id):
                link = self._links.get(conn_id)
                if link is not None:
                    link.gone = True
                    link.wake.set()
                    if link.scope is not None:
                        link.scope.cancel()
            case OpenConnection(conn_id=conn_id, host=host, port=port):
                assert self._tasks is not None
                link = self._links[conn_id] = _Link(conn_id)
                self._tasks.start_soon(self._redis_link, link, host, port)

    def _output_ready(self) -> None:
        links = self._links
        for conn_id in self._core.take_ready():
            link = links.get(conn_id)
            if link is not None:
                link.wake.set()

    def _turn_wanted(self) -> None:
        if not self._turn_pending and self._tasks is not None:
            self._turn_pending = True
            self._tasks.start_soon(self._turn)

    async def _turn(self) -> None:
        await checkpoint()
        self._turn_pending = False
        self._end_turn()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        assert self._tasks is not None

        async def run() -> None:
            await job()

        self._tasks.start_soon(run)

    def _hooks_waiting(self) -> None:
        self._hooks_ready.set()

    async def _hook_runner(self) -> None:
        while True:
            await self._hooks_ready.wait()
            self._hooks_ready = anyio.Event()
            await self._run_queued_hooks()

    def _arm(self, deadline: float | None) -> None:
        self._deadline = deadline
        self._moved.set()

    async def _timer(self) -> None:
        while True:
            deadline = self._deadline
            moved = self._moved = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, deadline - self._clock())
            with anyio.move_on_after(delay):
                await moved.wait()
            if not moved.is_set():
                self._timer_fired()

    def _abort_all(self) -> None:
        for link in list(self._links.values()):
            link.gone = True
            link.wake.set()
            if link.scope is not None:
                link.scope.cancel()

    # ------------------------------------------------------------------ Redis links

    async def _redis_link(self, link: _Link, host: str, port: int) -> None:
        conn_id = link.conn_id
        error: str | None = None
        with anyio.CancelScope() as scope:
            link.scope = scope
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as exc:
                error = str(exc) or type(exc).__name__
            else:
                async with stream, anyio.create_task_group() as tasks:
                    self._event(ConnectionOpened(conn_id=conn_id, now=self._clock(),
                                                 wall_time=self._wall()))
                    tasks.start_soon(self._redis_writer, link, stream, tasks.cancel_scope)
                    error = await self._redis_reader(link, stream)
                    tasks.cancel_scope.cancel()
        self._close_link(link, error)

    async def _redis_reader(self, link: _Link, stream: anyio.abc.SocketStream) -> str | None:
        while True:
            while link.paused:
                await link.resumed.wait()
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            except OSError as exc:
                return str(exc) or type(exc).__name__
            self._event(BytesReceived(conn_id=link.conn_id, data=data, now=self._clock(),
                                      wall_time=self._wall()))

    async def _redis_writer(
        self, link: _Link, stream: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        while True:
            await link.wake.wait()
            link.wake = anyio.Event()
            data = None if link.gone else self._core.data_to_send(link.conn_id)
            if data is None:
                scope.cancel()
                return
            if data:
                try:
                    await stream.send(data)
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    scope.cancel()
                    return
