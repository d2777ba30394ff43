"""Test helpers for users and for us: a fake clock, fake transports, and peers that speak real frames.

``Harness`` runs a ``TankServer`` on a ``FakeClock`` and carries out its actions into in-memory
transports (a data lane, a control lane, written first, and a closed state). ``FakePeer`` is a
WebSocket client built on wsproto: what it sends and reads are real RFC 6455 bytes, so a test says
"peer sends ``sub:news``" and checks what the peer reads. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from .actions import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    BrokerClose,
    BrokerConnect,
    BrokerWrite,
    CloseTransport,
    DiscardPending,
    Notification,
    PauseReading,
    ResumeReading,
    SendBytes,
    SendBytesToEach,
    SendControl,
)
from .client import ClientAction, Connect, DropTransport, TankClient, Write
from .config import ServerConfig
from .events import BytesReceived, Flushed, TransportClosed, UpgradeAuthorized, UpgradeRefused
from .server import TankServer

__all__ = ["ClientLink", "FakeClock", "FakePeer", "FakeTransport", "Harness", "HttpAnswer"]

_WALL_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: wall time is data, fixed for replayable traces


class FakeClock:
    """A monotonic clock that moves only when told; starts at a random large offset by default
    (as trio's SystemClock does) so code that assumes the clock starts at 0 fails loudly."""

    def __init__(self, start: float | None = None, *, seed: int | None = None) -> None:
        if start is None:
            start = 10_000.0 + random.Random(seed).random() * 1_000_000.0
        self.now = float(start)
        self._origin = self.now

    @property
    def wall_time(self) -> float:
        return _WALL_EPOCH + (self.now - self._origin)

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        return self.now

    def jump_to(self, when: float) -> float:
        if when > self.now:
            self.now = when
        return self.now


@dataclass
class FakeTransport:
    """What the server asked to be written to one connection, lane by lane."""

    conn_id: int
    data: list[bytes] = field(default_factory=list)
    control: list[bytes] = field(default_factory=list)
    #: "open", "closing" (close after flushing), "closed" or "aborted".
    state: str = "open"
    paused: bool = False
    #: Bytes handed to the peer so far, in order.
    written: bytearray = field(default_factory=bytearray)

    def pending_bytes(self) -> int:
        return sum(map(len, self.data)) + sum(map(len, self.control))


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
    ) -> None:
        self.server = TankServer(config, rng=random.Random(seed))
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
        #: Broker actions (a server with ``config.broker``), for the test to carry out.
        self.broker_actions: list[BrokerConnect | BrokerWrite | BrokerClose] = []

    # -------------------------------------------------------------- driving the server

    @property
    def now(self) -> float:
        return self.clock.now

    def accept(self, peer_host: str = "127.0.0.1") -> int:
        conn_id = self.server.accept(peer_host=peer_host, now=self.clock.now)
        self.transports[conn_id] = FakeTransport(conn_id)
        return conn_id

    def feed(self, conn_id: int, data: bytes) -> list[Action]:
        return self.apply(
            self.server.receive(
                BytesReceived(
                    conn_id=conn_id, data=data, now=self.clock.now, wall_time=self.clock.wall_time
                )
            )
        )

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
        """Carry out actions as an adapter would (writes are queued until ``flush``)."""
        done = list(actions)
        for action in done:
            self.log.append(action)
            match action:
                case SendBytes(conn_id=conn_id, data=data):
                    self._queue(conn_id, data, control=False)
                case SendBytesToEach(conn_ids=conn_ids, data=data):
                    for conn_id in conn_ids:
                        self._queue(conn_id, data, control=False)
                case SendControl(conn_id=conn_id, data=data):
                    self._queue(conn_id, data, control=True)
                case DiscardPending(conn_id=conn_id):
                    self.transports[conn_id].data.clear()
                case CloseTransport(conn_id=conn_id):
                    transport = self.transports[conn_id]
                    if transport.state == "open":
                        transport.state = "closing"
                        if not transport.data and not transport.control:
                            self._closed_by_us(transport)
                case AbortTransport(conn_id=conn_id):
                    transport = self.transports[conn_id]
                    transport.state = "aborted"
                    transport.data.clear()
                    transport.control.clear()
                case PauseReading(conn_id=conn_id):
                    self.transports[conn_id].paused = True
                case ResumeReading(conn_id=conn_id):
                    self.transports[conn_id].paused = False
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
                case BrokerConnect() | BrokerWrite() | BrokerClose():
                    self.broker_actions.append(action)
                case _:
                    self.notifications.append(action)
        return done

    def answer_authorization(self, conn_id: int, accept: bool, status: int = 401) -> list[Action]:
        now, wall = self.clock.now, self.clock.wall_time
        if accept:
            event: UpgradeAuthorized | UpgradeRefused = UpgradeAuthorized(
                conn_id=conn_id, now=now, wall_time=wall
            )
        else:
            event = UpgradeRefused(conn_id=conn_id, now=now, wall_time=wall, status=status)
        return self.apply(self.server.receive(event))

    def _queue(self, conn_id: int, data: bytes, *, control: bool) -> None:
        transport = self.transports[conn_id]
        if transport.state in ("closed", "aborted"):
            return
        (transport.control if control else transport.data).append(data)

    def flush(self, conn_id: int) -> bytes:
        """Write everything queued for ``conn_id`` (control lane first); report ``Flushed``."""
        transport = self.transports[conn_id]
        control = b"".join(transport.control)
        data = b"".join(transport.data)
        transport.control.clear()
        transport.data.clear()
        out = control + data
        transport.written += out
        if out:
            self.apply(
                self.server.receive(
                    Flushed(
                        conn_id=conn_id,
                        now=self.clock.now,
                        data_bytes=len(data),
                        control_bytes=len(control),
                    )
                )
            )
        if transport.state == "closing":
            self._closed_by_us(transport)
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
    ) -> FakePeer:
        """Open a connection and complete the handshake; the peer has read the Hello frame."""
        peer = FakePeer(self, peer_host=peer_host)
        target = path if path is not None else self.config.path
        if user_id is not None:
            target += "?user_id=" + quote(user_id, safe="")
        peer.handshake(target, headers)
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
        """Send one HTTP/1.1 request on a fresh connection and read the answer."""
        conn_id = self.accept(peer_host)
        client = h11.Connection(h11.CLIENT)
        hdrs = [("host", "tank.test"), *headers]
        if body:
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


class FakePeer:
    """A WebSocket client over a ``Harness`` connection, built on wsproto's client side."""

    def __init__(self, harness: Harness, *, peer_host: str = "127.0.0.1") -> None:
        self.harness = harness
        self.conn_id = harness.accept(peer_host)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.auto_pong = True
        #: Complete messages read so far (text as str, binary as bytes).
        self.messages: list[str | bytes] = []
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        self.close: CloseConnection | None = None
        self.rejected: RejectConnection | None = None
        self.accepted = False
        self.user_id = ""
        self._parts: list[str | bytes] = []

    @property
    def transport(self) -> FakeTransport:
        return self.harness.transports[self.conn_id]

    def handshake(self, target: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        extra = [(k.encode(), v.encode()) for k, v in headers]
        self.send_raw(self.ws.send(Request(host="tank.test", target=target, extra_headers=extra)))
        self.read()
        if self.accepted and self.messages:
            hello = self.messages[0]
            if isinstance(hello, str) and hello.startswith("Hello, "):
                self.user_id = hello[len("Hello, ") : -len("! Welcome to WebSocket server.")]

    # sending -------------------------------------------------------------------

    def send_raw(self, data: bytes) -> list[Action]:
        return self.harness.feed(self.conn_id, data)

    def send_text(self, text: str) -> list[Action]:
        return self.send_raw(self.ws.send(Message(data=text)))

    def send_binary(self, data: bytes) -> list[Action]:
        return self.send_raw(self.ws.send(Message(data=data)))

    def send_ping(self, payload: bytes = b"") -> list[Action]:
        return self.send_raw(self.ws.send(Ping(payload=payload)))

    def send_close(self, code: int | None = 1000, reason: str = "") -> list[Action]:
        # wsproto only sends an empty Close for the enum member itself (wsproto #182).
        close_code = CloseReason.NO_STATUS_RCVD if code is None else code
        return self.send_raw(self.ws.send(CloseConnection(code=close_code, reason=reason or None)))

    def vanish(self, error: str | None = None) -> list[Action]:
        """The transport is gone without a closing handshake."""
        return self.harness.peer_closed(self.conn_id, error)

    # reading -------------------------------------------------------------------

    def read(self) -> list[Event]:
        """Read what the server wrote (flushing it); answer Pings unless ``auto_pong`` is off."""
        data = self.harness.flush(self.conn_id)
        if not data or self.close is not None:
            return []
        self.ws.receive_data(data)
        events: list[Event] = []
        # Handle each event as it comes: wsproto changes state while its generator is consumed,
        # so a Ping read before a Close is answered before the Close moves the state on.
        for event in self.ws.events():
            events.append(event)
            match event:
                case AcceptConnection():
                    self.accepted = True
                case RejectConnection() as rejected:
                    self.rejected = rejected
                case RejectData():
                    pass
                case TextMessage(data=text, message_finished=done):
                    self._collect(text, done)
                case BytesMessage(data=raw, message_finished=done):
                    self._collect(bytes(raw), done)
                case Ping(payload=payload):
                    self.pings.append(bytes(payload))
                    # wsproto refuses a Pong once we sent our Close (LOCAL_CLOSING).
                    if self.auto_pong and self.ws.state is ConnectionState.OPEN:
                        self.send_raw(self.ws.send(event.response()))
                case Pong(payload=payload):
                    self.pongs.append(bytes(payload))
                case CloseConnection() as close:
                    self.close = close
        return events

    def _collect(self, part: str | bytes, done: bool) -> None:
        self._parts.append(part)
        if done:
            first = self._parts[0]
            if isinstance(first, str):
                self.messages.append("".join(p for p in self._parts if isinstance(p, str)))
            else:
                self.messages.append(b"".join(p for p in self._parts if isinstance(p, bytes)))
            self._parts = []

    def take(self) -> list[str | bytes]:
        """Read, then return and forget every complete message read so far."""
        self.read()
        out, self.messages = self.messages, []
        return out


def basic_auth_header(user: str, password: str) -> tuple[str, str]:
    """An ``Authorization: Basic`` header (handy for authentication-hook tests)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("authorization", f"Basic {token}")


class ClientLink:
    """A ``TankClient`` wired to a ``Harness`` server on the same fake clock.

    ``Connect`` opens a fake connection on the harness (unless ``refuse_connections`` is set),
    ``Write`` feeds the server, ``pump()`` carries the server's output back. Notifications the
    client emits are collected in ``events``.
    """

    def __init__(self, harness: Harness, client: TankClient) -> None:
        self.harness = harness
        self.client = client
        self.conn_id: int | None = None
        self.events: list[ClientAction] = []
        self.refuse_connections = False
        #: When False the server is frozen (SIGSTOP): its timer stops, what the client writes or
        #: closes waits in the kernel (held here) and reaches it once it runs again.
        self.server_reachable = True
        self.reads = True
        self._held: list[tuple[str, int, bytes]] = []

    def run(self, actions: Iterable[ClientAction]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            match action:
                case Connect():
                    if self.refuse_connections:
                        pending += self.client.transport_lost(
                            now=self.harness.now, error="connection refused"
                        )
                    else:
                        self.conn_id = self.harness.accept()
                        pending += self.client.transport_opened(now=self.harness.now)
                case Write(data=data):
                    if self.conn_id is not None:
                        self._to_server("write", self.conn_id, data)
                case DropTransport():
                    if self.conn_id is not None:
                        self._to_server("close", self.conn_id, b"")
                        self.conn_id = None
                case _:
                    self.events.append(action)

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
            conn_id = self.conn_id
            if conn_id is None or not self.server_reachable or not self.reads:
                return
            transport = self.harness.transports[conn_id]
            data = self.harness.flush(conn_id)
            if data:
                self.run(self.client.data_received(data, now=self.harness.now))
            if transport.state in ("closed", "aborted") and self.conn_id == conn_id:
                self.conn_id = None  # the client sends no DropTransport for a lost transport
                self.run(self.client.transport_lost(now=self.harness.now))
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
