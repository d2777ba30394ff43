"""Shared helpers for the trio adapter tests: run a test body under trio with a time bound, start a
server on a free port, and a raw wsproto client over trio sockets for peers that misbehave."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from client_backends import count_tasks
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

import tank_trio
from tank_core import ServerConfig

#: Short heartbeat settings keep the suite fast (issue 3: "for example 0.2 s / 0.6 s").
FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)
#: Default heartbeat, short close timeout: tests that leave clients unread end quickly.
QUICK = ServerConfig(close_timeout=0.3)


def run(body: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """``trio.run(body)``, failing the test if it takes longer than ``timeout`` seconds."""

    async def bounded() -> Any:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


async def start(
    nursery: trio.Nursery, config: ServerConfig | None = None, **hooks: Any
) -> tank_trio.Server:
    return await tank_trio.serve_in(nursery, config, "127.0.0.1", 0, **hooks)


class RawClient:
    """A WebSocket client on wsproto over a trio TCP stream; the test decides what it answers."""

    def __init__(self, stream: trio.SocketStream, *, auto_pong: bool) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.auto_pong = auto_pong
        self.pending: deque[Event] = deque()
        self.pings = 0
        self.messages: list[str] = []
        self.reject: RejectConnection | None = None
        self._parts: list[str] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str = "/ws",
        *,
        auto_pong: bool = True,
        headers: Iterable[tuple[str, str]] = (),
        rcvbuf: int | None = None,
    ) -> RawClient:
        if rcvbuf is not None:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream, auto_pong=auto_pong)
        extra = [(k.encode(), v.encode()) for k, v in headers]
        await client._send(client.ws.send(Request(host="127.0.0.1", target=target, extra_headers=extra)))
        event = await client.next_event()
        if isinstance(event, RejectConnection):
            client.reject = event
        else:
            assert isinstance(event, AcceptConnection), event
        return client

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self._send(self.ws.send(Message(data=text)))

    async def send_close(self, code: int = 1000) -> None:
        await self._send(self.ws.send(CloseConnection(code=code)))

    async def next_event(self) -> Event:
        """The next wsproto event (answering Pings when ``auto_pong``); EOFError at end of stream."""
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.pings += 1
                    if self.auto_pong:
                        await self._send(self.ws.send(event.response()))
                self.pending.append(event)
        return self.pending.popleft()

    async def recv_text(self) -> str:
        """The next complete text message, skipping control frames; AssertionError on a Close."""
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    text = "".join(self._parts)
                    self._parts = []
                    self.messages.append(text)
                    return text
            elif isinstance(event, BytesMessage):
                raise AssertionError("the server must only send text frames")
            elif isinstance(event, CloseConnection):
                raise AssertionError(f"closed while waiting for a message: {event}")

    async def recv_until_close(self) -> CloseConnection:
        """Read messages (kept in ``messages``) until the server's Close."""
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    self.messages.append("".join(self._parts))
                    self._parts = []
            elif isinstance(event, CloseConnection):
                return event

    async def aclose(self) -> None:
        await self.stream.aclose()


__all__ = ["FAST", "QUICK", "RawClient", "count_tasks", "run", "start"]
