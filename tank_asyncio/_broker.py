"""The asyncio side of the broker link: the core's two Redis connections as asyncio Protocols.

``tank_core.BrokerLink`` decides everything (DESIGN.md §5): what to open, what to write, when Redis
counts as gone, when to try again. This pump only carries ``BrokerConnect``, ``BrokerWrite`` and
``BrokerClose`` out, and feeds opens, bytes and losses back through the server's one dispatch path
(and so its one timer). A connection the core has given up on is closed here and never reported
again; a connection that opens after the core gave up on it is dropped at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tank_core import Action, BrokerClose, BrokerConnect, BrokerRole, BrokerWrite

from . import _clock

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["BrokerPump"]


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class _RedisProtocol(asyncio.Protocol):
    """One Redis connection: reads go to the core, writes come from ``BrokerWrite``."""

    def __init__(self, pump: BrokerPump, role: BrokerRole, generation: int) -> None:
        self.pump = pump
        self.role = role
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        #: Closed by us (the core asked) or lost: nothing more is reported.
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.gone:
            self.pump.received(self, data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.pump.lost(self, exc)


class BrokerPump:
    """Carries the broker actions of one server; owned by ``Server``."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._conns: dict[BrokerRole, _RedisProtocol] = {}
        self._connecting: dict[BrokerRole, tuple[int, asyncio.Task[None]]] = {}

    # ------------------------------------------------------------------ actions from the core

    def connect(self, action: BrokerConnect) -> None:
        self._drop(action.role)
        task = asyncio.get_running_loop().create_task(
            self._open(action), name=f"tank redis {action.role.value}"
        )
        self._connecting[action.role] = (action.generation, task)

    def write(self, action: BrokerWrite) -> None:
        protocol = self._conns.get(action.role)
        if (
            protocol is not None
            and protocol.generation == action.generation
            and not protocol.gone
            and protocol.transport is not None
        ):
            protocol.transport.write(action.data)

    def close(self, action: BrokerClose) -> None:
        pending = self._connecting.get(action.role)
        if pending is not None and pending[0] == action.generation:
            del self._connecting[action.role]
            pending[1].cancel()
        protocol = self._conns.get(action.role)
        if protocol is not None and protocol.generation == action.generation:
            del self._conns[action.role]
            protocol.gone = True
            if protocol.transport is not None:
                if action.graceful:
                    protocol.transport.close()  # after what is queued
                else:
                    protocol.transport.abort()

    def close_all(self) -> None:
        """The server has stopped: drop whatever is left."""
        for role in list(self._connecting) + list(self._conns):
            self._drop(role)

    # ------------------------------------------------------------------ connection events

    async def _open(self, action: BrokerConnect) -> None:
        loop = asyncio.get_running_loop()
        role, generation = action.role, action.generation
        try:
            transport, protocol = await loop.create_connection(
                lambda: _RedisProtocol(self, role, generation), action.host, action.port
            )
        except OSError as exc:
            if self._is_pending(role, generation):
                del self._connecting[role]
                error = _describe(exc)
                self._report(
                    lambda now, wall: self._server.core.broker_closed(
                        role, generation, now=now, wall_time=wall, error=error
                    )
                )
            return
        if not self._is_pending(role, generation):
            transport.abort()  # the core gave up on this attempt meanwhile
            return
        del self._connecting[role]
        self._conns[role] = protocol
        self._report(
            lambda now, wall: self._server.core.broker_opened(
                role, generation, now=now, wall_time=wall
            )
        )

    def received(self, protocol: _RedisProtocol, data: bytes) -> None:
        role, generation = protocol.role, protocol.generation
        self._report(
            lambda now, wall: self._server.core.broker_received(
                role, generation, data, now=now, wall_time=wall
            )
        )

    def lost(self, protocol: _RedisProtocol, exc: Exception | None) -> None:
        if protocol.gone:
            return
        protocol.gone = True
        if self._conns.get(protocol.role) is protocol:
            del self._conns[protocol.role]
        role, generation = protocol.role, protocol.generation
        error = None if exc is None else _describe(exc)
        self._report(
            lambda now, wall: self._server.core.broker_closed(
                role, generation, now=now, wall_time=wall, error=error
            )
        )

    # ------------------------------------------------------------------ internals

    def _is_pending(self, role: BrokerRole, generation: int) -> bool:
        pending = self._connecting.get(role)
        return pending is not None and pending[0] == generation

    def _drop(self, role: BrokerRole) -> None:
        pending = self._connecting.pop(role, None)
        if pending is not None:
            pending[1].cancel()
        protocol = self._conns.pop(role, None)
        if protocol is not None:
            protocol.gone = True
            if protocol.transport is not None:
                protocol.transport.abort()

    def _report(self, call: Callable[[float, float], list[Action]]) -> None:
        server = self._server
        if not server.broker_reports_wanted():
            return
        try:
            actions = call(_clock.now(), time.time())
        except Exception as exc:  # a bug in shared state: the server stops (DESIGN.md §4)
            server._fail(exc)
            return
        server._dispatch(actions)
