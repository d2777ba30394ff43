"""The trio side of the broker link: the core's two Redis connections as tasks in the server's nursery.

``tank_core.BrokerLink`` decides everything (DESIGN.md §5); this pump carries ``BrokerConnect``,
``BrokerWrite`` and ``BrokerClose`` out and feeds opens, bytes and losses back through the server.
Each connection is one task (connect, then read) with one writer task beside it, the only code that
writes to that stream, inside a cancel scope the core's ``BrokerClose`` cancels. The tasks run in
the server's nursery: an unexpected error in them fails the server instead of leaving it deaf.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from tank_core import Action, BrokerClose, BrokerConnect, BrokerRole, BrokerWrite

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["BrokerPump"]

_RECEIVE_SIZE = 65536
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class _RedisConn:
    __slots__ = ("closing", "generation", "gone", "out", "role", "scope", "wake")

    def __init__(self, role: BrokerRole, generation: int) -> None:
        self.role = role
        self.generation = generation
        self.scope = trio.CancelScope()
        #: Bytes waiting for the writer.
        self.out: list[bytes] = []
        #: Set while the writer waits for bytes.
        self.wake: trio.Event | None = None
        #: Close once ``out`` is written (a graceful ``BrokerClose``).
        self.closing = False
        #: Given up by the core, or reported lost: nothing more is reported.
        self.gone = False

    def notify(self) -> None:
        if self.wake is not None:
            self.wake.set()
            self.wake = None


class BrokerPump:
    """Carries the broker actions of one server; owned by ``Server``."""

    def __init__(self, server: Server, nursery: trio.Nursery) -> None:
        self._server = server
        self._nursery = nursery
        self._conns: dict[BrokerRole, _RedisConn] = {}

    # ------------------------------------------------------------------ actions from the core

    def connect(self, action: BrokerConnect) -> None:
        old = self._conns.pop(action.role, None)
        if old is not None:
            old.gone = True
            old.scope.cancel()
        conn = _RedisConn(action.role, action.generation)
        self._conns[action.role] = conn
        self._nursery.start_soon(
            self._run, conn, action.host, action.port, name=f"tank redis {action.role.value}"
        )

    def write(self, action: BrokerWrite) -> None:
        conn = self._conns.get(action.role)
        if conn is not None and conn.generation == action.generation and not conn.gone:
            conn.out.append(action.data)
            conn.notify()

    def close(self, action: BrokerClose) -> None:
        conn = self._conns.get(action.role)
        if conn is None or conn.generation != action.generation:
            return
        del self._conns[action.role]
        conn.gone = True
        if action.graceful:
            conn.closing = True  # the writer finishes what is queued, then cancels the scope
            conn.notify()
        else:
            conn.scope.cancel()

    # ------------------------------------------------------------------ tasks

    async def _run(self, conn: _RedisConn, host: str, port: int) -> None:
        try:
            with conn.scope:
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError as exc:
                    self._lost(conn, _describe(exc))
                    return
                try:
                    if conn.gone:
                        return  # given up while connecting
                    self._report(
                        conn,
                        lambda now, wall: self._server._core.broker_opened(
                            conn.role, conn.generation, now=now, wall_time=wall
                        ),
                    )
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer, conn, stream)
                        await self._reader(conn, stream)
                        nursery.cancel_scope.cancel()
                finally:
                    stream.socket.close()
        except Exception as exc:  # a bug of ours: the server stops (DESIGN.md §4)
            self._server._fail(exc)

    async def _reader(self, conn: _RedisConn, stream: trio.SocketStream) -> None:
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    self._lost(conn, None)
                    return
                if conn.gone:
                    continue  # closing gracefully: keep reading until the writer is done
                self._received(conn, data)
        except _IO_ERRORS as exc:
            self._lost(conn, _describe(exc))

    async def _writer(self, conn: _RedisConn, stream: trio.SocketStream) -> None:
        try:
            while True:
                if conn.out:
                    data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
                    conn.out = []
                    await stream.send_all(data)
                elif conn.closing:
                    conn.scope.cancel()
                    return
                else:
                    wake = conn.wake = trio.Event()
                    await wake.wait()
        except _IO_ERRORS as exc:
            self._lost(conn, _describe(exc))
            conn.scope.cancel()

    # ------------------------------------------------------------------ reports to the core

    def _received(self, conn: _RedisConn, data: bytes) -> None:
        self._report(
            conn,
            lambda now, wall: self._server._core.broker_received(
                conn.role, conn.generation, data, now=now, wall_time=wall
            ),
        )

    def _lost(self, conn: _RedisConn, error: str | None) -> None:
        conn.scope.cancel()
        if conn.gone:
            return
        conn.gone = True
        if self._conns.get(conn.role) is conn:
            del self._conns[conn.role]
        self._report(
            conn,
            lambda now, wall: self._server._core.broker_closed(
                conn.role, conn.generation, now=now, wall_time=wall, error=error
            ),
            force=True,
        )

    def _report(
        self,
        conn: _RedisConn,
        call: Callable[[float, float], list[Action]],
        force: bool = False,
    ) -> None:
        server = self._server
        if (conn.gone and not force) or not server.broker_reports_wanted():
            return
        try:
            actions = call(trio.current_time(), time.time())
        except Exception as exc:  # a bug in shared state: the server stops (DESIGN.md §4)
            server._fail(exc)
            return
        server._after(actions)
