"""One accepted socket as the trio adapter holds it: two lanes, a parked writer, a reading switch.

Nothing here knows the core. The lanes follow docs/adapters.md: the control lane (Pongs, Pings,
HTTP answers) is written before the data lane, whose bytes the core counts against
``max_outbox_bytes``. The writer task parks with ``wait_task_rescheduled(abort_wait)`` and is woken by
``Connection.wake``: one ``reschedule`` per recipient of a fan-out, no Event to rebuild. Sockets
are plain non-blocking ones, closed only through ``close_socket`` (trio's ``notify_closing`` first,
so a task waiting on the socket gets ``trio.ClosedResourceError`` instead of waiting forever).
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from trio.lowlevel import Abort, Task, notify_closing, reschedule, wait_writable

__all__ = ["Connection", "abort_wait", "close_socket", "describe", "send_rest"]


def abort_wait(_raise_cancel: Any) -> Abort:
    """For ``wait_task_rescheduled``: a parked writer may always be cancelled."""
    return Abort.SUCCEEDED


class Connection:
    """One accepted socket: its two lanes, its writer's wake-up slot, its reading switch."""

    __slots__ = (
        "closing",
        "conn_id",
        "control",
        "data",
        "dead",
        "parked",
        "reported",
        "resume",
        "sock",
        "tasks",
    )

    def __init__(self, conn_id: int, sock: socket.socket) -> None:
        self.conn_id = conn_id
        #: Non-blocking; closed only through ``close_socket``.
        self.sock = sock
        #: Control lane (Pongs, Pings, HTTP answers): written before the data lane.
        self.control: list[bytes] = []
        #: Data lane (counted by the core against max_outbox_bytes).
        self.data: list[bytes] = []
        #: The writer task while it waits for work.
        self.parked: Task | None = None
        #: Set while reading is paused; the reader waits on it.
        self.resume: trio.Event | None = None
        #: Close the socket once the lanes are empty (CloseTransport, or the peer's EOF).
        self.closing = False
        #: The socket is closed (or being torn down): both tasks leave.
        self.dead = False
        #: TransportClosed has been fed to the core (exactly once per socket).
        self.reported = False
        #: Reader and writer still running.
        self.tasks = 2

    def wake(self) -> None:
        task = self.parked
        if task is not None:
            self.parked = None
            reschedule(task)


def close_socket(sock: socket.socket) -> None:
    """Close now (synchronous); a task waiting on the socket gets ``trio.ClosedResourceError``."""
    if sock.fileno() != -1:
        notify_closing(sock)
        sock.close()


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def send_rest(sock: socket.socket, buf: bytes, sent: int) -> None:
    """Finish a write the kernel took only part of, waiting for room as often as needed."""
    view = memoryview(buf)
    while sent < len(view):
        await wait_writable(sock)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            continue
