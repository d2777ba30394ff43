"""``Harness``: a ``TankServer`` on a fake clock whose sockets are in-memory transports.

Every action is carried out at once except writes: what the server has to write stays in it until
``flush`` takes it, so a test can model a peer that stops reading. ``output_log`` records what the
server queued, dropped or asked to close, for tests that check every byte.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

import h11
from wsproto.extensions import Extension

from ..actions import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    OpenConnection,
    PauseReading,
    ResumeReading,
)
from ..config import ServerConfig
from ..errors import LocalProtocolError
from ..events import (
    BytesReceived,
    ConnectionOpened,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
)
from ..notifications import Notification
from ..server import TankServer
from ..server.hooks import NOTIFICATION_KINDS
from .clock import FakeClock

if TYPE_CHECKING:
    from .peer import FakePeer

__all__ = ["CloseAsked", "Discarded", "FakeTransport", "Harness", "HttpAnswer", "OutputRecord", "Queued"]

#: Every kind of action a ``TankServer`` returns (``Harness.apply`` refuses anything else).
_ACTION_KINDS: tuple[type, ...] = (
    AbortTransport,
    PauseReading,
    ResumeReading,
    OpenConnection,
    AuthorizeUpgrade,
    AuthorizeSubscription,
    *NOTIFICATION_KINDS,
)


@dataclass
class FakeTransport:
    """One connection as the harness's fake adapter holds it; what waits to be written stays in
    the server (``data`` and ``control`` show its two lanes) until ``Harness.flush`` takes it."""

    conn_id: int
    server: TankServer | None = None
    #: "open", "closing" (close after flushing), "closed" or "aborted".
    state: str = "open"
    paused: bool = False
    #: Bytes handed to the peer so far, in order.
    written: bytearray = field(default_factory=bytearray)

    @property
    def data(self) -> list[bytes]:
        """The server's data lane for this connection (not yet taken)."""
        output = None if self.server is None else self.server._output_of(self.conn_id)
        return [] if output is None else list(output.data)

    @property
    def control(self) -> list[bytes]:
        """The server's control lane for this connection (not yet taken)."""
        output = None if self.server is None else self.server._output_of(self.conn_id)
        return [] if output is None else list(output.control)

    def pending_bytes(self) -> int:
        return sum(map(len, self.data)) + sum(map(len, self.control))


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued:
    """What the server put on a connection's lanes during a test: ``data`` for each of
    ``conn_ids``, on the control lane or the data lane (``Harness.output_log``)."""

    conn_ids: tuple[int, ...]
    data: bytes
    control: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Discarded:
    """The server dropped the untaken data lane of ``conn_id`` (a slow consumer, a fault)."""

    conn_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseAsked:
    """The server wants ``conn_id`` closed once its lanes are taken."""

    conn_id: int


OutputRecord = Queued | Discarded | CloseAsked


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


class Harness:
    """A ``TankServer`` on a fake clock with fake transports; every action is carried out at once
    except writes, which wait for ``flush`` (so a test can model a peer that stops reading)."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        clock: FakeClock | None = None,
        seed: int = 0,
        authorize: bool | None = None,
        server: TankServer | None = None,
    ) -> None:
        self.server = server if server is not None else TankServer(config, rng=random.Random(seed))
        self.config = self.server.config
        self.clock = clock if clock is not None else FakeClock(seed=seed)
        self.transports: dict[int, FakeTransport] = {}
        self.notifications: list[Notification] = []
        self.authorization_requests: list[AuthorizeUpgrade] = []
        self.subscription_requests: list[AuthorizeSubscription] = []
        #: When set, AuthorizeSubscription is answered at once with this verdict.
        self.authorize_subscriptions: bool | None = None
        #: When set, AuthorizeUpgrade is answered at once with this verdict.
        self.authorize = authorize
        self.log: list[Action] = []
        #: End the server's loop turns at once after each feed and flush (``turns``); off, the
        #: test calls ``server.end_turn`` itself.
        self.auto_turns = True
        #: Connections the server asked to open (a node's Redis links), for the test to answer
        #: with ``opened``/``feed``/``peer_closed``; their writes are taken with ``flush``.
        self.opens: list[OpenConnection] = []
        #: Everything the server queued, dropped or asked to close, in order.
        self.output_log: list[OutputRecord] = []
        self.server._output_observer = self._observe

    # -------------------------------------------------------------- driving the server

    @property
    def now(self) -> float:
        return self.clock.now

    def accept(self, peer_host: str = "127.0.0.1") -> int:
        conn_id = self.server.accept(peer_host=peer_host, now=self.clock.now)
        self.transports[conn_id] = FakeTransport(conn_id, self.server)
        return conn_id

    def start(self) -> list[Action]:
        """``TankServer.start`` (a cluster node asks for its Redis connections here)."""
        return self.apply(self.server.start(now=self.clock.now, wall_time=self.clock.wall_time))

    def opened(self, conn_id: int) -> list[Action]:
        """A connection asked for with ``OpenConnection`` is open."""
        return self.apply(
            self.server.receive(
                ConnectionOpened(conn_id=conn_id, now=self.clock.now, wall_time=self.clock.wall_time)
            )
        )

    def feed(self, conn_id: int, data: bytes) -> list[Action]:
        actions = self.apply(
            self.server.receive(
                BytesReceived(
                    conn_id=conn_id, data=data, now=self.clock.now, wall_time=self.clock.wall_time
                )
            )
        )
        return actions + self.turns()

    def turns(self) -> list[Action]:
        """With ``auto_turns`` (the default), end loop turns while the server wants them, as an
        adapter's next iterations would: input past the turn budget is handled, pipelined HTTP
        requests go on once their answers are taken. Returns what they did."""
        actions: list[Action] = []
        while self.auto_turns and self.server.turn_wanted:
            actions += self.apply(self.server.end_turn(self.clock.now, wall_time=self.clock.wall_time))
        return actions

    def peer_closed(self, conn_id: int, error: str | None = None) -> list[Action]:
        transport = self.transports.get(conn_id)
        if transport is not None and transport.state == "open":
            transport.state = "closed"
        return self.apply(
            self.server.receive(
                TransportClosed(
                    conn_id=conn_id, now=self.clock.now, wall_time=self.clock.wall_time, error=error
                )
            )
        )

    def tick(self) -> list[Action]:
        return self.apply(self.server.tick(self.clock.now, wall_time=self.clock.wall_time))

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock, ticking at every deadline on the way (an adapter that wakes on time)."""
        target = self.clock.now + seconds
        actions: list[Action] = []
        while True:
            deadline = self.server.next_deadline()
            if deadline is None or deadline > target:
                break
            self.clock.jump_to(deadline)
            actions += self.tick()
        self.clock.jump_to(target)
        actions += self.tick()
        return actions

    def apply(self, actions: Iterable[Action]) -> list[Action]:
        """Carry out actions as an adapter would; what the server has to write stays in it until
        ``flush``, except that a connection it wants closed with nothing left is closed at once."""
        done = list(actions)
        for action in done:
            if not isinstance(action, _ACTION_KINDS):
                raise LocalProtocolError(
                    f"Harness.apply takes the actions a TankServer returns, got {action!r}"
                )
        for action in done:
            self.log.append(action)
            match action:
                case AbortTransport() | PauseReading() | ResumeReading() | OpenConnection():
                    self.carry_out(action)
                case AuthorizeSubscription() as ask:
                    self.subscription_requests.append(ask)
                    if self.authorize_subscriptions is not None:
                        self.apply(
                            self.server.subscription_verdict(
                                ask.conn_id,
                                ask.topic,
                                self.authorize_subscriptions,
                                now=self.clock.now,
                                wall_time=self.clock.wall_time,
                            )
                        )
                case AuthorizeUpgrade() as request:
                    self.authorization_requests.append(request)
                    if self.authorize is not None:
                        self.answer_authorization(request.conn_id, self.authorize)
                case _:
                    self.notifications.append(action)
        self._closes()
        return done

    def carry_out(
        self, action: AbortTransport | PauseReading | ResumeReading | OpenConnection
    ) -> None:
        """One transport action, as a socket adapter would carry it out."""
        match action:
            case AbortTransport(conn_id=conn_id):
                transport = self.transports.get(conn_id)
                if transport is not None:
                    transport.state = "aborted"
            case PauseReading(conn_id=conn_id):
                self.transports[conn_id].paused = True
            case ResumeReading(conn_id=conn_id):
                self.transports[conn_id].paused = False
            case OpenConnection(conn_id=conn_id):
                self.opens.append(action)
                self.transports[conn_id] = FakeTransport(conn_id, self.server)

    def _observe(self, kind: str, conn_ids: tuple[int, ...], data: bytes) -> None:
        if kind == "discard":
            self.output_log.append(Discarded(conn_id=conn_ids[0]))
        elif kind == "close":
            self.output_log.append(CloseAsked(conn_id=conn_ids[0]))
        else:
            self.output_log.append(Queued(conn_ids=conn_ids, data=data, control=kind == "control"))

    def close_asked(self, conn_id: int, since: int = 0) -> bool:
        """Whether the server asked to close ``conn_id`` (in ``output_log[since:]``)."""
        return CloseAsked(conn_id=conn_id) in self.output_log[since:]

    def _closes(self) -> None:
        """Connections the server wants closed: closing now, or closed once nothing is left.
        (The harness writes only on ``flush``, so it looks at every connection, not only at those
        ``take_ready`` names: a connection named once is not named again until taken from.)"""
        self.server.take_ready()
        for conn_id, transport in list(self.transports.items()):
            output = self.server._output_of(conn_id)
            if output is None or not output.closing or transport.state not in ("open", "closing"):
                continue
            if transport.state == "open":
                transport.state = "closing"
            if transport.state == "closing" and not output.data and not output.control:
                self.flush(conn_id)

    def answer_authorization(self, conn_id: int, accept: bool, status: int = 401) -> list[Action]:
        now, wall = self.clock.now, self.clock.wall_time
        if accept:
            event: UpgradeAuthorized | UpgradeRefused = UpgradeAuthorized(
                conn_id=conn_id, now=now, wall_time=wall
            )
        else:
            event = UpgradeRefused(conn_id=conn_id, now=now, wall_time=wall, status=status)
        return self.apply(self.server.receive(event))

    def flush(self, conn_id: int) -> bytes:
        """Write everything waiting for ``conn_id`` (the server gives control frames first); close
        the connection when the server says nothing more will come."""
        transport = self.transports[conn_id]
        if transport.state in ("closed", "aborted"):
            return b""
        out = self.server.data_to_send(conn_id)
        if out is None:
            self._closed_by_us(transport)
            return b""
        transport.written += out
        output = self.server._output_of(conn_id)
        if output is not None and output.closing:
            transport.state = "closing"
            if self.server.data_to_send(conn_id) is None:
                self._closed_by_us(transport)
        self.turns()
        return out

    def _closed_by_us(self, transport: FakeTransport) -> None:
        """A close we asked for completed: the adapter reports the socket gone."""
        transport.state = "closed"
        self.apply(
            self.server.receive(
                TransportClosed(
                    conn_id=transport.conn_id, now=self.clock.now, wall_time=self.clock.wall_time
                )
            )
        )

    # -------------------------------------------------------------- peers

    def connect(
        self,
        user_id: str | None = None,
        *,
        path: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        peer_host: str = "127.0.0.1",
        extensions: Sequence[Extension] = (),
        subprotocols: Sequence[str] = (),
    ) -> FakePeer:
        """Open a connection and complete the handshake; the peer has read the Hello frame.
        ``extensions`` are wsproto's, offered by the peer (``[PerMessageDeflate()]``, say), and
        ``subprotocols`` too (``["tank.recovery.v1"]``)."""
        from .peer import FakePeer  # the peer module builds on this one

        peer = FakePeer(self, peer_host=peer_host)
        target = path if path is not None else self.config.path
        if user_id is not None:
            target += "?user_id=" + quote(user_id, safe="")
        peer.handshake(target, headers, extensions=extensions, subprotocols=subprotocols)
        return peer

    def http(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        peer_host: str = "127.0.0.1",
    ) -> HttpAnswer:
        """Send one HTTP/1.1 request on a fresh connection and read the answer.

        As ``tank pub`` does, it names the server ``localhost`` and sends a body as
        ``application/json`` unless ``headers`` say otherwise."""
        conn_id = self.accept(peer_host)
        client = h11.Connection(h11.CLIENT)
        given = {name.lower() for name, _ in headers}
        hdrs = [*headers] if "host" in given else [("host", "localhost"), *headers]
        if body:
            if "content-type" not in given:
                hdrs.append(("content-type", "application/json"))
            hdrs.append(("content-length", str(len(body))))
        wire = client.send(h11.Request(method=method, target=target, headers=hdrs))
        wire = (wire or b"") + (client.send(h11.Data(data=body)) or b"" if body else b"")
        wire += client.send(h11.EndOfMessage()) or b""
        self.feed(conn_id, wire)
        client.receive_data(self.flush(conn_id))
        response = client.next_event()
        assert isinstance(response, h11.Response), response
        chunks = bytearray()
        while True:
            event = client.next_event()
            if isinstance(event, h11.Data):
                chunks += event.data
            else:
                break
        self.peer_closed(conn_id)
        return HttpAnswer(
            status=response.status_code,
            headers={k.decode(): v.decode() for k, v in response.headers},
            body=bytes(chunks),
        )
