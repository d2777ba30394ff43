"""One asyncio ``Protocol`` per socket, accepted or opened for the core (a Redis link): its reader.

Bytes read go to the core at once. Writing is the server's (``Server._flush_ready``): never while
the transport is above its high-water mark, so what a stalled reader does not take stays counted in
the core, which closes it as a slow consumer.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from tank_core.events import BytesReceived

from . import _clock

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["TankProtocol"]


class TankProtocol(asyncio.Protocol):
    __slots__ = ("accepted", "conn_id", "gone", "server", "transport", "writable")

    def __init__(self, server: Server, conn_id: int = 0) -> None:
        self.server = server
        self.conn_id = conn_id  # the core's; 0 until connection_made for an accepted socket
        self.accepted = conn_id == 0  # False: opened on the core's OpenConnection
        self.transport: asyncio.Transport | None = None
        self.writable = False  # registered, not paused, not closed: output may be taken now
        self.gone = False  # closed or aborted by us, or lost: nothing more is written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server._connection_made(self, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.server._event(BytesReceived(conn_id=self.conn_id, data=data, now=_clock.now(),
                                         wall_time=time.time()))

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost reports it to the core

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        if not self.gone:
            self.writable = True
            self.server._drain(self)
