"""One socket as the trio adapter holds it, accepted or opened on the core's word; no bytes wait here.

Sockets are plain non-blocking ones, closed only through ``close_socket``: trio's ``notify_closing``
first, so a task waiting on the socket gets ``trio.ClosedResourceError`` instead of waiting forever.
"""

from __future__ import annotations

import socket

import trio
from trio.lowlevel import notify_closing, wait_writable

__all__ = ["Connection", "close_socket", "describe", "plain_socket", "send_rest"]


class Connection:
    """One socket and what its two tasks (reader, writer) agree on."""

    __slots__ = ("conn_id", "dead", "eof", "lingering", "pending", "resume", "sock", "tls")

    def __init__(self, conn_id: int, sock: socket.socket) -> None:
        self.conn_id, self.sock = conn_id, sock
        self.resume: trio.Event | None = None  # set while reading is paused: the reader waits on it
        self.eof = False  # the peer sent EOF: the writer closes once nothing is queued
        self.dead = False  # closed (or being torn down): both tasks leave
        self.pending = b""  # taken by the flusher, not sent whole: the writer sends the rest first
        self.lingering = False  # we sent FIN after our last bytes; reading on until the peer's
        self.tls: trio.SSLStream[trio.SocketStream] | None = None  # wss://: its writer sends all


def plain_socket(stream: trio.SocketStream) -> socket.socket:
    """From trio's socket to the plain non-blocking one (TCP_NODELAY already set by trio)."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


def close_socket(sock: socket.socket) -> None:
    """Close now; a task waiting on the socket gets ``trio.ClosedResourceError``."""
    if sock.fileno() != -1:
        notify_closing(sock)
        sock.close()


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def send_rest(sock: socket.socket, data: bytes, sent: int) -> None:
    """Finish a write the kernel took only part of, waiting for room as often as needed."""
    view = memoryview(data)
    while sent < len(view):
        await wait_writable(sock)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            continue
