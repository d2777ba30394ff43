"""One asyncio ``Protocol`` per socket: the reader and the one writer of that socket.

It holds only per-socket transport state; every decision is the core's and every write goes through
``Server._dispatch`` (one place, DESIGN.md §1: "exactly one writer per connection").

Writing (DESIGN.md §3, "Flushed"): while the transport is not paused, the bytes of one dispatch are
coalesced into one ``transport.write`` (control lane first) and reported flushed at once. While it is
paused (``pause_writing``, above the write buffer's high-water mark), both lanes are held here and
handed over on ``resume_writing``, control lane first, and only then reported flushed: a stalled
reader shows up promptly as held bytes in the core's outbox, which closes it as a slow consumer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, cast

from tank_core import BytesReceived

from . import _clock

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["TankProtocol"]


class TankProtocol(asyncio.Protocol):
    __slots__ = (
        "b_ctrl",
        "b_data",
        "batched",
        "close_after",
        "conn_id",
        "gone",
        "held",
        "held_ctrl",
        "paused",
        "server",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn_id = 0
        self.transport: asyncio.Transport | None = None
        #: Chunks gathered this loop iteration, per lane (None: nothing yet).
        self.b_ctrl: list[bytes] | None = None
        self.b_data: list[bytes] | None = None
        #: Listed in the server's touched sockets (writes gathered this loop iteration).
        self.batched = False
        #: The transport is above its high-water mark: hold writes until ``resume_writing``.
        self.paused = False
        #: Bytes held while paused, per lane; created on the first pause (idle sockets carry none).
        self.held: deque[bytes] | None = None
        self.held_ctrl: list[bytes] | None = None
        #: The core asked to close the socket once everything queued is written.
        self.close_after = False
        #: Closed or aborted by us, or lost: nothing more is written.
        self.gone = False

    def gather(self, data: bytes, *, control: bool, touched: list[TankProtocol]) -> None:
        """Add ``data`` to this iteration's writes on one lane; list the socket as touched."""
        if control:
            if self.b_ctrl is None:
                self.b_ctrl = [data]
            else:
                self.b_ctrl.append(data)
        elif self.b_data is None:
            self.b_data = [data]
        else:
            self.b_data.append(data)
        self.touch(touched)

    def touch(self, touched: list[TankProtocol]) -> None:
        """List the socket among those written at the end of this loop iteration (once)."""
        if not self.batched:
            self.batched = True
            touched.append(self)

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server._connection_made(self, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server._debug:
            server._trace_in(self, data)
        try:
            actions = server._core.receive(
                BytesReceived(
                    conn_id=self.conn_id, data=data, now=_clock.now(), wall_time=time.time()
                )
            )
        except Exception as exc:
            server._fail(exc)
            return
        server._dispatch(actions)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost reports it to the core

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        if self.held is None:
            self.held = deque()
            self.held_ctrl = []

    def resume_writing(self) -> None:
        self.paused = False
        if self.held is not None:
            self.server._drain(self)
