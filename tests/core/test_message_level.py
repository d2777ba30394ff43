"""Connections whose transport frames WebSocket messages itself (ASGI): ``accept(messages=True)``,
``MessageArrived``/``CloseArrived`` in, ``messages_to_send`` out, every rule the same as a socket's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tank_core import ServerConfig
from tank_core.errors import LocalProtocolError
from tank_core.events import BytesReceived, CloseArrived, MessageArrived, UpgradeRefused
from tank_core.notifications import ClientDisconnected
from tank_core.server import TankServer
from tank_core.server.message_output import (
    AcceptWebSocket,
    HttpAnswer,
    OutgoingClose,
    OutgoingText,
)

NOW = 100.0


def upgrade(user_id: str, extra: str = "") -> bytes:
    return (
        f"GET /ws?user_id={user_id} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    ).encode()


class Framed:
    """A server and its message-level connections, on a fake clock."""

    def __init__(self, **config: Any) -> None:
        watch = config.pop("watch", False)
        self.server = TankServer(ServerConfig(**config), watch_framed_silence=watch)
        self.now = NOW
        self.log: list[Any] = []

    def feed(self, event: Any) -> None:
        self.log += self.server.receive(event)

    def connect(self, user_id: str, extra: str = "") -> int:
        conn = self.server.accept(peer_host="127.0.0.1", now=self.now, messages=True)
        self.feed(BytesReceived(conn_id=conn, data=upgrade(user_id, extra), now=self.now,
                                wall_time=0.0))
        return conn

    def say(self, conn: int, text: str | bytes, binary: bool = False) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.feed(MessageArrived(conn_id=conn, data=data, binary=binary, now=self.now,
                                 wall_time=0.0))

    def out(self, conn: int) -> tuple[Any, ...] | None:
        return self.server.messages_to_send(conn)

    def texts(self, conn: int) -> list[str]:
        return [m.text for m in self.out(conn) or () if isinstance(m, OutgoingText)]

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.log += self.server.tick(self.now, wall_time=0.0)


def test_upgrade_hello_subscribe_publish_and_no_compression() -> None:
    f = Framed()
    a = f.connect("a", "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert f.out(a) == (AcceptWebSocket(), OutgoingText(text="Hello, a! Welcome to WebSocket server."))
    f.say(a, "sub:news")
    assert f.server.publish("news", "x" * 500, now=f.now, wall_time=0.0)[0] == 1
    (message,) = f.out(a) or ()
    assert isinstance(message, OutgoingText)
    assert json.loads(message.text) == {"topic": "news", "data": "x" * 500}
    assert f.server.stats().compressed_connections == 0  # the transport agrees its own


def test_a_fan_out_is_read_back_once_for_all_recipients() -> None:
    f = Framed()
    conns = [f.connect(f"u{i}") for i in range(3)]
    for conn in conns:
        f.out(conn)
        f.say(conn, "sub:t")
    f.server.publish("t", "shared", now=f.now, wall_time=0.0)
    outs = [f.out(conn) or () for conn in conns]
    assert len(outs[0]) == 1 and outs[0][0] is outs[1][0] is outs[2][0]  # decoded once


def test_pings_stay_with_the_transport_and_silence_is_not_fatal_unless_watched() -> None:
    f = Framed(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    quiet = f.connect("quiet")
    f.out(quiet)
    for _ in range(10):
        f.tick(1.0)
        assert f.texts(quiet) == ["heartbeat"]  # the text heartbeat, no Ping
    assert f.server.engine.is_open(quiet)
    assert f.server.stats().pings_sent == 0  # none queued, none counted
    watched = Framed(heartbeat_interval=1.0, heartbeat_timeout=3.0, watch=True)
    conn = watched.connect("quiet")
    watched.out(conn)
    for _ in range(4):
        watched.tick(1.0)
    assert OutgoingClose(code=1011, reason="heartbeat timeout") in (watched.out(conn) or ())


def test_too_big_not_utf8_and_the_frame_rate() -> None:
    f = Framed(max_message_size=10)
    a = f.connect("a")
    f.out(a)
    f.say(a, b"\xff\xfe", binary=True)  # PROTOCOL.md [fix]: dropped
    assert f.server.stats().messages_dropped == 1
    f.say(a, "x" * 11)
    assert f.out(a) == (OutgoingClose(code=1009, reason="message larger than 10 bytes"),)


def test_close_arrived_ends_the_connection_with_the_peers_code() -> None:
    f = Framed()
    a = f.connect("a")
    f.out(a)
    f.feed(CloseArrived(conn_id=a, code=4001, reason="bye", now=f.now, wall_time=0.0))
    (gone,) = [e for e in f.log if isinstance(e, ClientDisconnected)]
    assert (gone.code, gone.reason) == (4001, "bye")
    assert f.out(a) is None
    f.say(a, "late")  # a race with the transport: ignored


def test_a_refused_upgrade_and_an_api_call_are_http_answers() -> None:
    f = Framed(authenticate=True)
    a = f.connect("a")
    f.feed(UpgradeRefused(conn_id=a, now=f.now, wall_time=0.0, status=401, reason="Unauthorized"))
    (answer,) = f.out(a) or ()
    assert isinstance(answer, HttpAnswer) and answer.status == 401
    assert answer.body == b"Unauthorized"
    api = f.server.accept(peer_host="127.0.0.1", now=f.now, messages=True)
    body = b'{"topic":"t","data":"d"}'
    f.feed(BytesReceived(conn_id=api, data=(
        b"POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)) + body, now=f.now, wall_time=0.0))
    (answer,) = f.out(api) or ()
    assert isinstance(answer, HttpAnswer)
    assert (answer.status, json.loads(answer.body)) == (200, {"delivered": 0})
    assert (b"content-type", b"application/json") in answer.headers


def test_messages_on_a_byte_connection_are_the_callers_mistake() -> None:
    f = Framed()
    conn = f.server.accept(peer_host="127.0.0.1", now=f.now)
    with pytest.raises(LocalProtocolError, match="messages=True"):
        f.say(conn, "x")
    framed = f.server.accept(peer_host="127.0.0.1", now=f.now, messages=True)
    with pytest.raises(LocalProtocolError, match="not upgraded"):
        f.say(framed, "x")


def test_the_recovery_subprotocol_is_accepted_through_the_transport() -> None:
    from tank_core import History

    f = Framed(history=History())
    a = f.connect("a", "Sec-WebSocket-Protocol: chat, tank.recovery.v1\r\n")
    out = f.out(a) or ()
    assert out[0] == AcceptWebSocket(subprotocol="tank.recovery.v1")
    f.say(a, 'recover:{"topic":"t"}')
    (marker,) = f.texts(a)
    assert json.loads(marker) == {"type": "recovered", "topic": "t", "epoch": "", "offset": 0,
                                  "complete": True}
