"""Regression tests for bugs found by review: peers (a server, Redis, another node) can never make
the core raise, and the client's tick keeps its contract."""

from __future__ import annotations

import base64
import hashlib
import random
import re

import pytest

from tank_core import BrokerConfig, ClientConfig, LocalProtocolError, ServerConfig, TankClient
from tank_core.actions import OpenConnection
from tank_core.client import Closed, MessageArrived
from tank_core.cluster.vocabulary import BrokerRole
from tank_core.events import BytesReceived, ConnectionOpened
from tank_core.server import TankServer


def _broker_server() -> tuple[TankServer, int]:
    """A cluster node with both Redis connections open; returns it and the subscriber's id."""
    server = TankServer(ServerConfig(broker=BrokerConfig.from_url("redis://127.0.0.1:6379")))
    opens = server.start(now=1000.0, wall_time=0.0)
    assert server.broker is not None
    for action in opens:
        assert isinstance(action, OpenConnection)
        server.receive(ConnectionOpened(conn_id=action.conn_id, now=1000.0, wall_time=0.0))
    return server, server._broker_ids[(BrokerRole.SUBSCRIBER, server.broker.generation)]


@pytest.mark.parametrize(
    "push",
    [
        b"*3\r\n$7\r\nmessage\r\n*0\r\n$1\r\nx\r\n",  # a channel that is an array
        b"*3\r\n$9\r\nsubscribe\r\n*0\r\n:1\r\n",
    ],
)
def test_redis_pushes_with_odd_channels_mean_reconnect_not_a_crash(push: bytes) -> None:
    server, subscriber = _broker_server()
    actions = server.receive(
        BytesReceived(conn_id=subscriber, data=push, now=1000.0, wall_time=0.0)
    )
    assert any(type(a).__name__ == "BrokerDown" for a in actions)


def _receive(client: TankClient, data: bytes, now: float) -> list[object]:
    conn_id = client.conn_id
    assert conn_id is not None
    return list(client.receive(BytesReceived(conn_id=conn_id, data=data, now=now, wall_time=0.0)))


def _connected(client: TankClient, now: float) -> bytes:
    """Start ``client`` and report its connection open; returns the upgrade request it wrote."""
    (action,) = client.start(now=now)
    assert isinstance(action, OpenConnection) and action.conn_id == client.conn_id
    assert client.receive(ConnectionOpened(conn_id=action.conn_id, now=now, wall_time=0.0)) == []
    assert client.take_ready() == [action.conn_id]
    request = client.data_to_send(action.conn_id)
    assert request
    return request


def _open_client(**options: object) -> TankClient:
    client = TankClient(ClientConfig(url="ws://127.0.0.1:1/ws", heartbeat=False, **options))  # type: ignore[arg-type]
    request = _connected(client, 1.0)
    key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request)
    assert key is not None
    accept = base64.b64encode(
        hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    _receive(
        client,
        b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        1.0,
    )
    return client


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    ],
)
def test_a_bad_upgrade_answer_is_a_lost_connection(reply: bytes) -> None:
    client = TankClient(ClientConfig(url="ws://127.0.0.1:1/ws"))
    _connected(client, 1.0)
    actions = _receive(client, reply, 1.1)
    closed = [a for a in actions if isinstance(a, Closed)]
    assert closed and closed[0].code == 1006 and not closed[0].final


def test_lone_surrogates_are_refused_when_given() -> None:
    client = TankClient(ClientConfig(url="ws://127.0.0.1:1/ws"))
    with pytest.raises(LocalProtocolError):
        client.subscribe("\ud800", now=1.0)
    with pytest.raises(LocalProtocolError):
        client.send("x\udfff", now=1.0)
    assert client.topics == () and client.queued == 0


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return bytes(((0x80 if fin else 0) | opcode, len(payload))) + payload


def test_binary_split_mid_character_is_decoded_whole() -> None:
    client = _open_client()
    euro = "€".encode()
    out = _receive(
        client,
        _frame(2, b"ab", fin=False) + _frame(0, b"c" + euro[:1], fin=False) + _frame(0, euro[1:]),
        1.3,
    )
    out += _receive(client, _frame(1, b"next"), 1.4)
    texts = [a.text for a in out if isinstance(a, MessageArrived)]
    assert texts[-2:] == ["abc€", "next"]


def test_a_zero_backoff_inside_tick_starts_the_attempt_at_once() -> None:
    class ZeroJitter(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    client = TankClient(ClientConfig(url="ws://127.0.0.1:1/ws"), rng=ZeroJitter())
    client.start(now=100.0)
    deadline = client.next_deadline()
    assert deadline is not None
    client.tick(deadline)  # connect timeout, then a zero delay
    after = client.next_deadline()
    assert after is None or after > deadline
    assert client.tick(deadline) == []  # idempotent
