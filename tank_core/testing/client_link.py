"""``ClientLink``: the client machine wired to a ``Harness`` server on the same fake clock."""

from __future__ import annotations

from collections.abc import Iterable

from ..actions import AbortTransport, OpenConnection
from ..client.machine import ClientAction, ClientEvent, TankClient
from ..events import BytesReceived, ConnectionOpened, TransportClosed
from .harness import Harness

__all__ = ["ClientLink"]


class ClientLink:
    """A ``TankClient`` wired to a ``Harness`` server on the same fake clock.

    ``OpenConnection`` opens a fake connection on the harness (unless ``refuse_connections`` is
    set), what the client has to write (``take_ready``/``data_to_send``) feeds the server at once,
    ``pump()`` carries the server's output back. Notifications the client emits are collected in
    ``events``; what it did to its connections in ``transport_log``: each ``OpenConnection`` and
    ``AbortTransport``, ``("write", conn_id, size)`` and ``("close", conn_id)`` (a close after the
    output, asked with ``data_to_send`` returning None).
    """

    def __init__(self, harness: Harness, client: TankClient) -> None:
        self.harness = harness
        self.client = client
        #: The server's id of the client's current connection (None between connections).
        self.conn_id: int | None = None
        #: The server's id of each client connection still open, by the client's id.
        self.server_ids: dict[int, int] = {}
        self.events: list[ClientAction] = []
        self.transport_log: list[object] = []
        self.refuse_connections = False
        #: When False the server is frozen (SIGSTOP): its timer stops, what the client writes or
        #: closes waits in the kernel (held here) and reaches it once it runs again.
        self.server_reachable = True
        self.reads = True
        self._held: list[tuple[str, int, bytes]] = []

    def _note(self, item: object) -> None:
        """Something the client did to a connection (``transport_log``)."""
        self.transport_log.append(item)

    def receive(self, event: ClientEvent) -> None:
        """Feed one transport event to the client and carry out what follows."""
        self.run(self.client.receive(event))

    def _opened(self, conn_id: int) -> ConnectionOpened:
        return ConnectionOpened(
            conn_id=conn_id, now=self.harness.now, wall_time=self.harness.clock.wall_time
        )

    def _gone(self, conn_id: int, error: str | None = None) -> TransportClosed:
        return TransportClosed(
            conn_id=conn_id, now=self.harness.now, wall_time=self.harness.clock.wall_time, error=error
        )

    def run(self, actions: Iterable[ClientAction]) -> None:
        """Carry out the client's actions in order, then write what it queued."""
        pending = list(actions)
        pending += self._write()
        while pending:
            action = pending.pop(0)
            match action:
                case OpenConnection(conn_id=conn_id):
                    self._note(action)
                    if self.refuse_connections:
                        pending += self.client.receive(self._gone(conn_id, "connection refused"))
                    else:
                        self.conn_id = self.server_ids[conn_id] = self.harness.accept()
                        pending += self.client.receive(self._opened(conn_id))
                case AbortTransport(conn_id=conn_id):
                    self._note(action)
                    self._drop(conn_id)
                case _:
                    self.events.append(action)
            pending += self._write()

    def _write(self) -> list[ClientAction]:
        actions: list[ClientAction] = []
        for conn_id in self.client.take_ready():
            while True:
                data = self.client.data_to_send(conn_id)
                server_id = self.server_ids.get(conn_id)
                if data is None:
                    self._note(("close", conn_id))
                    self._drop(conn_id)
                    # The close we asked for completed: the socket is reported gone.
                    actions += self.client.receive(self._gone(conn_id))
                    break
                if not data:
                    break
                self._note(("write", conn_id, len(data)))
                if server_id is not None:
                    self._to_server("write", server_id, data)
        return actions

    def _drop(self, conn_id: int) -> None:
        server_id = self.server_ids.pop(conn_id, None)
        if server_id is not None:
            self._to_server("close", server_id, b"")
            if self.conn_id == server_id:
                self.conn_id = None

    def _to_server(self, kind: str, conn_id: int, data: bytes) -> None:
        if not self.server_reachable:
            self._held.append((kind, conn_id, data))
            return
        transport = self.harness.transports[conn_id]
        if transport.state != "open":
            return
        if kind == "write":
            self.harness.feed(conn_id, data)
        else:
            self.harness.peer_closed(conn_id)

    def pump(self) -> None:
        """Carry the server's queued output to the client, until nothing moves."""
        if self.server_reachable and self._held:
            held, self._held = self._held, []
            for kind, held_id, held_data in held:
                self._to_server(kind, held_id, held_data)
        for _ in range(100):
            conn_id = self.client.conn_id
            server_id = self.server_ids.get(conn_id) if conn_id is not None else None
            if conn_id is None or server_id is None:
                return
            if not self.server_reachable or not self.reads:
                return
            transport = self.harness.transports[server_id]
            data = self.harness.flush(server_id)
            if data:
                self.receive(
                    BytesReceived(
                        conn_id=conn_id, data=data, now=self.harness.now,
                        wall_time=self.harness.clock.wall_time,
                    )
                )
            if transport.state in ("closed", "aborted") and conn_id in self.server_ids:
                del self.server_ids[conn_id]
                if self.conn_id == server_id:
                    self.conn_id = None
                self.receive(self._gone(conn_id))
                continue
            if not data:
                return

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move the shared clock, ticking server and client at each of their deadlines."""
        target = self.harness.clock.now + seconds
        while True:
            self.pump()
            # A frozen server (not reachable) does not run its timer either.
            server_deadline = self.harness.server.next_deadline() if self.server_reachable else None
            candidates = [
                d
                for d in (server_deadline, self.client.next_deadline())
                if d is not None and d <= target
            ]
            if not candidates:
                break
            when = min(candidates)
            if step is not None:
                when = min(when, self.harness.clock.now + step)
            self.harness.clock.jump_to(when)
            if self.server_reachable:
                self.harness.tick()
            self.run(self.client.tick(self.harness.clock.now))
        self.harness.clock.jump_to(target)
        if self.server_reachable:
            self.harness.tick()
        self.run(self.client.tick(self.harness.clock.now))
        self.pump()
