"""What the core has to write to one connection: two lanes, taken by the adapter when it can write.

The core owns every byte it will write (DESIGN.md §3, "Taking output"). Each connection has a
*control lane* (Pongs, Pings, HTTP answers) and a *data lane* (data frames, the Close frame, Redis
commands). ``take`` hands the adapter the control lane first, then whole data-lane chunks, joined
into one ``bytes``: every chunk is a complete frame, so a control frame can only ever land between
two frames, never inside one (RFC 6455 §5.4: control frames "MAY be injected in the middle of a
fragmented message", never inside a frame). ``Outputs`` lists the connections that got something
since the adapter last asked, each once, so everything queued during one loop iteration leaves in
one write.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["OutboxAccount", "Output", "Outputs"]


class OutboxAccount(Protocol):
    """Where a connection's unsent data bytes are counted (the engine's connection record)."""

    outbox: int


class Output:
    """The two lanes of one connection, and whether it is to be closed once they are empty."""

    __slots__ = (
        "account", "closing", "conn_id", "control", "control_bytes", "data", "listed", "watch"
    )

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        self.control: list[bytes] = []
        #: Bytes on the control lane (bounded by the server: MAX_CONTROL_BACKLOG).
        self.control_bytes = 0
        self.data: list[bytes] = []
        #: Close the transport once both lanes are taken.
        self.closing = False
        #: The ``Outputs.round`` in which it was last listed: listed at most once per round.
        self.listed = -1
        #: Data bytes taken are counted off here (a WebSocket connection's outbox); None: no
        #: account (HTTP answers, Redis links).
        self.account: OutboxAccount | None = None
        #: Tell the server once both lanes are taken (HTTP requests wait for their answers).
        self.watch = False

    def take(self, max_bytes: int | None) -> tuple[bytes, int]:
        """Everything queued (or whole chunks up to about ``max_bytes``), control lane first;
        returns (bytes, how many of them came from the data lane)."""
        control = self.control
        data = self.data
        if control:
            self.control = []
            self.control_bytes = 0
            head = control[0] if len(control) == 1 else b"".join(control)
        else:
            head = b""
        if not data:
            return head, 0
        if max_bytes is None or len(data) == 1:
            self.data = []
            body = data[0] if len(data) == 1 else b"".join(data)
        else:
            size = 0
            count = 0
            for chunk in data:
                size += len(chunk)
                count += 1
                if size >= max_bytes:
                    break
            taken = data[:count]
            self.data = data[count:]
            body = b"".join(taken)
        return (head + body if head else body), len(body)


class Outputs:
    """Every connection's ``Output``, and the list of those with something new for the adapter."""

    __slots__ = ("by_id", "ready", "round")

    def __init__(self) -> None:
        self.by_id: dict[int, Output] = {}
        #: Connections given output (or a close) since the adapter's last ``take_ready``.
        self.ready: list[int] = []
        #: How many times ``take_ready`` has handed a list over: a connection is listed at most
        #: once per round, and taking the list starts a new round without touching any output.
        self.round = 0

    def add(self, conn_id: int) -> Output:
        output = Output(conn_id)
        self.by_id[conn_id] = output
        return output

    def mark(self, output: Output) -> None:
        if output.listed != self.round:
            output.listed = self.round
            self.ready.append(output.conn_id)

    def take_ready(self) -> list[int]:
        """The connections listed since the last call, each once."""
        ready = self.ready
        if not ready:
            return []  # never the live list: what is marked later must not appear in it
        self.ready = []
        self.round += 1
        return ready
