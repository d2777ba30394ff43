"""``TankClient`` speaks the server's stream vocabulary: ``OpenConnection`` with a fresh id per
attempt, ``ConnectionOpened``/``BytesReceived``/``TransportClosed`` through ``receive`` (stale ids
ignored), output pulled with ``take_ready``/``data_to_send`` on a control and a data lane,
``AbortTransport`` to drop, and ``None`` from ``data_to_send`` to close after the last frames."""

from __future__ import annotations

import random

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from tank_core import ClientConfig, LocalProtocolError, TankClient
from tank_core.actions import AbortTransport, OpenConnection
from tank_core.client import ClientState, Closed, Opened
from tank_core.client.machine import ClientAction
from tank_core.events import BytesReceived, ConnectionOpened, TransportClosed

T0 = 1000.0


class Server:
    """The server side of one client connection, on wsproto."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.texts: list[str] = []
        self.pings = 0
        self.closed: CloseConnection | None = None

    def read(self, data: bytes) -> bytes:
        """Take the client's bytes; return what the server answers."""
        self.ws.receive_data(data)
        out = b""
        for event in self.ws.events():
            match event:
                case Request():
                    out += self.ws.send(AcceptConnection())
                case TextMessage(data=text):
                    self.texts.append(text)
                case Ping():
                    self.pings += 1
                case CloseConnection():
                    self.closed = event
        return out


def _client(url: str = "ws://127.0.0.1:8080/ws", **options: object) -> TankClient:
    config = ClientConfig(url=url, heartbeat_interval=1.0, heartbeat_timeout=3.0, **options)  # type: ignore[arg-type]
    return TankClient(config, rng=random.Random(0))


def _take(client: TankClient, conn_id: int) -> bytes | None:
    assert conn_id in client.take_ready()
    return client.data_to_send(conn_id)


def _feed(client: TankClient, conn_id: int, data: bytes, now: float = T0) -> list[ClientAction]:
    return client.receive(BytesReceived(conn_id=conn_id, data=data, now=now, wall_time=0.0))


def _open(client: TankClient, server: Server, now: float = T0) -> int:
    (action,) = client.start(now=now)
    assert isinstance(action, OpenConnection)
    conn_id = action.conn_id
    assert client.receive(ConnectionOpened(conn_id=conn_id, now=now, wall_time=0.0)) == []
    request = _take(client, conn_id)
    assert request
    actions = _feed(client, conn_id, server.read(request), now)
    assert actions == [Opened(reconnect=False, attempt=0)]
    return conn_id


def test_each_attempt_opens_a_fresh_connection_id_tls_for_wss() -> None:
    client = _client("wss://example.com/ws", reconnect_initial_delay=0.25)
    (first,) = client.start(now=T0)
    assert first == OpenConnection(conn_id=1, host="example.com", port=443, tls=True)
    assert client.conn_id == 1
    gone = client.receive(TransportClosed(conn_id=1, now=T0, wall_time=0.0, error="refused"))
    assert [type(a) for a in gone] == [Closed, type(gone[1])] and gone[0] == Closed(
        code=1006, reason="refused", final=False
    )
    assert client.conn_id is None
    deadline = client.next_deadline()
    assert deadline is not None
    (second,) = client.tick(deadline)
    assert second == OpenConnection(conn_id=2, host="example.com", port=443, tls=True)
    plain = _client("ws://h/ws").start(now=T0)
    assert plain == [OpenConnection(conn_id=1, host="h", port=80, tls=False)]


def test_events_for_another_connection_are_ignored() -> None:
    client, server = _client(), Server()
    conn_id = _open(client, server)
    for stale in (conn_id + 1, conn_id - 1):
        assert client.receive(ConnectionOpened(conn_id=stale, now=T0, wall_time=0.0)) == []
        assert _feed(client, stale, b"garbage") == []
        assert client.receive(TransportClosed(conn_id=stale, now=T0, wall_time=0.0)) == []
    assert client.state is ClientState.OPEN and client.conn_id == conn_id
    with pytest.raises(LocalProtocolError, match="transport event"):
        client.receive("bytes")  # type: ignore[arg-type]


def test_output_waits_in_the_core_until_taken_and_leaves_in_one_write() -> None:
    client, server = _client(), Server()
    conn_id = _open(client, server)
    assert client.data_to_send(conn_id) == b""  # nothing now
    assert client.data_to_send(99) is None  # not ours: nothing will ever come
    for topic in ("a", "b", "c"):
        client.subscribe(topic, now=T0)
    client.send("hello", now=T0)
    assert client.buffered > 0
    assert client.take_ready() == [conn_id]
    assert client.take_ready() == []  # listed once
    data = client.data_to_send(conn_id)
    assert data and client.buffered == 0
    server.read(data)
    assert server.texts == ["sub:a", "sub:b", "sub:c", "hello"]


def test_a_pong_goes_out_on_the_control_lane_before_queued_data() -> None:
    client, server = _client(), Server()
    conn_id = _open(client, server)
    client.send("first", now=T0)
    _feed(client, conn_id, server.ws.send(Ping(payload=b"p")))
    data = client.data_to_send(conn_id)
    assert data is not None
    # The Pong frame (FIN, opcode 0xA) comes first, whole, then the masked text frame.
    assert data[0] == 0x8A and data[-len(b"first") - 6] == 0x81


def test_a_graceful_close_ends_with_none_and_is_aborted_if_never_reported_gone() -> None:
    client, server = _client(), Server()
    conn_id = _open(client, server)
    assert client.close(now=T0) == []
    closing = _take(client, conn_id)
    assert closing is not None
    server.read(closing)
    assert server.closed is not None and server.closed.code == 1000
    actions = _feed(client, conn_id, server.ws.send(server.closed.response()), T0 + 0.1)
    assert actions == [Closed(code=1000, reason="", final=True)]
    assert client.conn_id is None and not client.finished
    assert _take(client, conn_id) is None  # close it after what was taken
    # Never reported gone: aborted close_timeout later, then the client is finished.
    deadline = client.next_deadline()
    assert deadline == T0 + 0.1 + client.config.close_timeout
    assert client.tick(deadline - 0.01) == []
    assert client.tick(deadline) == [AbortTransport(conn_id=conn_id)]
    assert client.finished and client.next_deadline() is None
    assert client.tick(deadline) == []  # idempotent


def test_reporting_a_closed_connection_gone_ends_its_deadline() -> None:
    client, server = _client(reconnect=False), Server()
    conn_id = _open(client, server)
    server_close = server.ws.send(CloseConnection(code=1001, reason="going away"))
    actions = _feed(client, conn_id, server_close, T0 + 1)
    assert actions == [Closed(code=1001, reason="going away", final=True)]
    echo = _take(client, conn_id)
    assert echo  # our Close, echoing 1001
    server.read(echo)
    assert server.closed is not None and server.closed.code == 1001
    assert client.data_to_send(conn_id) is None
    assert client.next_deadline() == T0 + 1 + client.config.close_timeout
    assert client.receive(TransportClosed(conn_id=conn_id, now=T0 + 1.5, wall_time=0.0)) == []
    assert client.finished and client.next_deadline() is None


def test_a_lost_connection_is_aborted_without_a_handshake() -> None:
    client, server = _client(), Server()
    conn_id = _open(client, server)
    actions = client.tick(T0 + 3.0)  # silence: heartbeat timeout
    assert AbortTransport(conn_id=conn_id) in actions
    assert client.data_to_send(conn_id) is None  # nothing more will come for it
    assert client.conn_id is None and client.state is ClientState.WAITING


def test_close_while_connecting_aborts_the_attempt() -> None:
    client = _client()
    (action,) = client.start(now=T0)
    assert isinstance(action, OpenConnection)
    assert client.close(now=T0) == [
        AbortTransport(conn_id=action.conn_id),
        Closed(code=1000, reason="", final=True),
    ]
    assert client.finished
    # The adapter's late answer changes nothing.
    assert client.receive(ConnectionOpened(conn_id=action.conn_id, now=T0, wall_time=0.0)) == []
    assert client.take_ready() == [] and client.finished
