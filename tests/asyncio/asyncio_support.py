"""Helpers for the asyncio adapter's tests: run a coroutine, open real clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one test coroutine on a fresh event loop, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def client(url: str, **kwargs: Any) -> ClientConnection:
    """A `websockets` client; it answers Pings on its own, as browsers do."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("ping_interval", None)
    return await connect(url, proxy=None, compression=None, **kwargs)


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``check()`` is true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (RFC 6455 §5.3: client frames are masked)."""
    key = os.urandom(4)
    head = bytes((0x80 | opcode,))
    length = len(payload)
    if length < 126:
        head += bytes((0x80 | length,))
    elif length < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", length)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", length)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


class RawPeer:
    """A WebSocket client on a plain socket, for peers that misbehave (e.g. stop reading)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, target: str, *, rcvbuf: int | None = None) -> RawPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send_text(self, text: str) -> None:
        self.writer.write(masked_frame(0x1, text.encode()))
        await self.writer.drain()

    async def send_close(self, code: int = 1000) -> None:
        self.writer.write(masked_frame(0x8, struct.pack("!H", code)))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.transport.abort()


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*aws))
