"""The client's connections as its adapter sees them: an id per attempt, what waits to be written.

Each attempt gets a fresh ``conn_id`` (``new``), so anything the adapter reports about an earlier
one is recognisably stale. What the client writes waits on the lanes of ``output.py`` until the
adapter takes it (``take_ready``, ``data_to_send``): Pings and Pongs on the control lane, everything
else on the data lane. A connection is dropped either at once (``abort``: ``AbortTransport``) or
after its last frames (``close_after_output``: ``data_to_send`` then says None); the latter must be
reported gone within ``close_timeout``, or ``expire`` aborts it.

What a server can make us queue is bounded here, by the server's own rule (``answer_ping``): a
server that pings and never reads gets no more Pongs added once ``MAX_CONTROL_BACKLOG`` bytes wait
on the control lane, only the latest one answered.
"""

from __future__ import annotations

from ..actions import AbortTransport
from ..server.output import Outputs
from ..wire.connection import MAX_CONTROL_BACKLOG

__all__ = ["ClientConnections"]

#: The first byte of a Pong frame (FIN set, opcode 0xA; RFC 6455 §5.2, §5.5.3): each write to the
#: control lane is one whole frame, so a queued Pong is recognised by it.
_PONG_HEAD = 0x8A


class ClientConnections:
    """The current connection, the output of each, and those closing after their output."""

    __slots__ = ("_last", "_outputs", "buffered", "current", "draining")

    def __init__(self) -> None:
        #: The connection of the current attempt (from ``OpenConnection`` until it is dropped).
        self.current: int | None = None
        self._last = 0
        self._outputs = Outputs()
        #: Bytes waiting on the current connection's lanes.
        self.buffered = 0
        #: Connections closed after their output, and when each is aborted if not reported gone.
        self.draining: dict[int, float] = {}

    def new(self) -> int:
        """A fresh id for the next attempt, which becomes the current connection."""
        self._last += 1
        self.current = self._last
        self.buffered = 0
        return self._last

    def opened(self) -> None:
        """The current connection is open: it gets its lanes."""
        if self.current is not None:
            self._outputs.add(self.current)

    def write(self, data: bytes, *, control: bool = False) -> None:
        """Queue ``data`` for the current connection (nothing if it has no lanes or is closing)."""
        conn_id = self.current
        output = self._outputs.by_id.get(conn_id) if conn_id is not None else None
        if output is None or output.closing:
            return
        if control:
            output.control.append(data)
            output.control_bytes += len(data)
        else:
            output.data.append(data)
        self.buffered += len(data)
        self._outputs.mark(output)

    @property
    def control_backlog(self) -> int:
        """Bytes on the current connection's control lane not taken yet (0 without lanes). Any
        ``data_to_send`` empties the control lane first, so more than 0 means nothing at all was
        taken since the oldest of them was queued."""
        conn_id = self.current
        output = self._outputs.by_id.get(conn_id) if conn_id is not None else None
        return 0 if output is None else output.control_bytes

    def answer_ping(self, pong: bytes) -> None:
        """Queue ``pong``, the answer to a Ping, unless the server leaves too many untaken.

        RFC 6455 §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
        response, unless it already received a Close frame"; §5.5.3: "If an endpoint receives a
        Ping frame and has not yet sent Pong frame(s) in response to previous Ping frame(s), the
        endpoint MAY elect to send a Pong frame for only the most recently processed Ping frame."
        So once ``MAX_CONTROL_BACKLOG`` bytes wait (a server that pings and never reads), the new
        Pong replaces the last one still waiting instead of adding to it (and is dropped when the
        last control frame waiting is our own Ping): the lane never holds more than the backlog
        plus one Pong, and the latest Ping is the one answered.
        """
        conn_id = self.current
        output = self._outputs.by_id.get(conn_id) if conn_id is not None else None
        if output is None or output.closing:
            return
        if output.control_bytes < MAX_CONTROL_BACKLOG:
            self.write(pong, control=True)
            return
        control = output.control
        if control and control[-1][0] == _PONG_HEAD:
            grown = len(pong) - len(control[-1])
            control[-1] = pong
            output.control_bytes += grown
            self.buffered += grown

    def abort(self) -> list[AbortTransport]:
        """Drop the current connection now, and whatever waits for it."""
        conn_id = self.current
        self.current = None
        self.buffered = 0
        if conn_id is None:
            return []
        self._outputs.by_id.pop(conn_id, None)
        return [AbortTransport(conn_id=conn_id)]

    def close_after_output(self, abort_at: float) -> None:
        """Close the current connection once what waits for it is taken; abort it at ``abort_at``
        if it is not reported gone by then."""
        conn_id = self.current
        self.current = None
        self.buffered = 0
        if conn_id is None:
            return
        output = self._outputs.by_id.get(conn_id)
        if output is not None:
            output.closing = True
            self._outputs.mark(output)
        self.draining[conn_id] = abort_at

    def forget(self, conn_id: int) -> bool:
        """The transport of ``conn_id`` is gone; True if it was the current connection."""
        self.draining.pop(conn_id, None)
        self._outputs.by_id.pop(conn_id, None)
        if conn_id != self.current:
            return False
        self.current = None
        self.buffered = 0
        return True

    def next_deadline(self) -> float | None:
        """When a connection closing after its output is next due to be aborted."""
        return min(self.draining.values()) if self.draining else None

    def expire(self, now: float) -> list[AbortTransport]:
        """Abort the connections closing after their output that are still there at ``now``."""
        due = [conn_id for conn_id, when in self.draining.items() if now >= when]
        for conn_id in due:
            self.forget(conn_id)
        return [AbortTransport(conn_id=conn_id) for conn_id in due]

    def take_ready(self) -> list[int]:
        return self._outputs.take_ready()

    def data_to_send(self, conn_id: int, max_bytes: int | None = None) -> bytes | None:
        outputs = self._outputs
        output = outputs.by_id.get(conn_id)
        if output is None:
            return None
        if not output.control and not output.data:
            if output.closing:
                del outputs.by_id[conn_id]
                return None
            return b""
        data, _ = output.take(max_bytes)
        if conn_id == self.current:
            self.buffered -= len(data)
        if output.closing or output.data:
            outputs.mark(output)  # listed again: the rest, or the None that closes it
        return data
