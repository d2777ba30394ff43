"""The contract, part 1: serving. The handshake, hooks and what they are given, the server's
commands and their counts, relay, the HTTP API and stats on the same port, bad peers."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
from contract_support import (
    HELLO,
    OP_CLOSE,
    RawPeer,
    Serve,
    close_payload,
    eventually,
    http,
    recv_text,
    ws_client,
)
from websockets.exceptions import ConnectionClosed

from tank_core import LocalProtocolError
from tank_core.notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorOccurred,
    MessageReceived,
    Notification,
    TopicSubscribed,
)


def test_it_listens_on_a_free_port_and_says_hello(serve: Serve) -> None:
    srv = serve()
    assert srv.port != 0 and srv.server.host == "127.0.0.1"
    assert srv.url == f"ws://127.0.0.1:{srv.port}/ws"
    with ws_client(srv.url + "?user_id=ann") as ws:
        assert recv_text(ws) == HELLO.format("ann")
    peer = RawPeer.open(srv.port, "/ws")  # no user_id: one is made up
    assert peer.recv_text().startswith("Hello, ")
    peer.close()


def test_hooks_are_called_with_their_events(serve: Serve) -> None:
    seen: list[Notification] = []
    connects: list[ClientConnected] = []
    messages: list[MessageReceived] = []
    disconnects: list[ClientDisconnected] = []
    srv = serve(
        on_connect=connects.append,
        on_message=messages.append,
        on_disconnect=disconnects.append,
        on_event=seen.append,
    )
    with ws_client(srv.url + "?user_id=bob") as ws:
        assert recv_text(ws) == HELLO.format("bob")
        ws.send("sub:news")
        ws.send("hello everyone")
        ws.send('{"type":"heartbeat"}')  # proof of life, not an application message
        eventually(lambda: srv.stats().messages_in == 3)
    eventually(lambda: disconnects)
    assert [c.user_id for c in connects] == ["bob"]
    assert [(m.text, m.user_id) for m in messages] == [("hello everyone", "bob")]
    assert messages[0].data == b"hello everyone"
    assert [(d.user_id, d.code) for d in disconnects] == [("bob", 1000)]
    assert [type(e) for e in seen] == [
        ClientConnected, TopicSubscribed, MessageReceived, ClientDisconnected,
    ]
    assert isinstance(seen[1], TopicSubscribed) and seen[1].topic == "news"


def test_coroutine_hooks_run_in_order_through_the_queue(serve: Serve) -> None:
    seen: list[str] = []

    async def on_event(event: Notification) -> None:
        await srv.nap(0)
        seen.append(type(event).__name__)

    async def on_connect(event: ClientConnected) -> None:
        seen.append("connect:" + event.user_id)

    srv = serve(on_event=on_event, on_connect=on_connect)
    with ws_client(srv.url + "?user_id=cy") as ws:
        recv_text(ws)
        ws.send("sub:a")
        eventually(lambda: "TopicSubscribed" in seen)
    eventually(lambda: "ClientDisconnected" in seen)
    assert seen == ["connect:cy", "ClientConnected", "TopicSubscribed", "ClientDisconnected"]
    assert srv.call(lambda s: s.dropped_events) == 0


@pytest.mark.parametrize("style", ["sync", "async"])
def test_a_hook_with_two_parameters_gets_the_server_and_can_publish(serve: Serve, style: str) -> None:
    servers: list[Any] = []

    def echo(event: MessageReceived, server: Any) -> None:
        servers.append(server)
        server.publish("echo", event.text.upper())

    async def echo_later(event: MessageReceived, server: Any) -> None:
        await srv.nap(0.01)
        echo(event, server)

    srv = serve(on_message=echo if style == "sync" else echo_later)
    with ws_client(srv.url + "?user_id=e") as ws:
        recv_text(ws)
        ws.send("sub:echo")
        eventually(lambda: srv.stats().topics.get("echo") == 1)
        ws.send("hello")
        assert json.loads(recv_text(ws)) == {"topic": "echo", "data": "HELLO"}
    assert servers == [srv.server]


def test_publish_broadcast_send_disconnect_return_counts(serve: Serve) -> None:
    srv = serve()
    a, b1, b2 = (ws_client(srv.url + f"?user_id={user}") for user in ("a", "b", "b"))
    for ws in (a, b1, b2):
        recv_text(ws)
    a.send("sub:news")
    b1.send("sub:news")
    eventually(lambda: srv.stats().topics.get("news") == 2)

    assert srv.call(lambda s: s.publish("news", "<hot>")) == 2
    for ws in (a, b1):
        assert json.loads(recv_text(ws)) == {"topic": "news", "data": "<hot>"}
    assert srv.call(lambda s: s.publish("nobody", "x")) == 0
    assert sorted(user for _conn, user in srv.call(lambda s: s.presence("news"))) == ["a", "b"]
    assert srv.call(lambda s: s.presence("nobody")) == []

    assert srv.call(lambda s: s.broadcast("to all")) == 3
    for ws in (a, b1, b2):
        assert recv_text(ws) == "to all"
    (a_id,) = srv.call(lambda s: [c for c in s.core.engine.open_connections()
                                  if s.core.engine.user_of(c) == "a"])
    assert srv.call(lambda s: s.broadcast("not a", exclude=a_id)) == 2
    assert recv_text(b1) == "not a"
    assert recv_text(b2) == "not a"

    assert srv.call(lambda s: s.send("b", "for b")) == 2
    assert recv_text(b1) == "for b"
    assert recv_text(b2) == "for b"
    assert srv.call(lambda s: s.send("ghost", "x")) == 0

    assert srv.call(lambda s: s.disconnect("b")) == 2
    for ws in (b1, b2):
        with pytest.raises(ConnectionClosed):
            recv_text(ws, timeout=3)
        assert ws.close_code == 1000
    assert srv.call(lambda s: s.disconnect("b")) == 0
    a.send("still here")  # relayed to nobody: everyone else left
    eventually(lambda: srv.stats().messages_in == 3)
    stats = srv.stats()
    assert stats.connections == 1
    assert stats.connections_total == 3
    assert stats.messages_out >= 8
    # The caller's mistake raises LocalProtocolError, changes nothing, and the server goes on.
    with pytest.raises(LocalProtocolError):
        srv.call(lambda s: s.publish(b"bytes topic", "d"))
    assert srv.call(lambda s: s.publish("t", "d")) == 0
    a.close()


def test_relay_reaches_every_other_client_but_not_the_sender(serve: Serve) -> None:
    srv = serve()
    clients = [ws_client(srv.url) for _ in range(3)]
    for ws in clients:
        recv_text(ws)
    clients[0].send("hi all")
    assert recv_text(clients[1]) == "hi all"
    assert recv_text(clients[2]) == "hi all"
    with pytest.raises(TimeoutError):
        recv_text(clients[0], timeout=0.2)
    for ws in clients:
        ws.close()


def test_http_api_and_stats_on_the_same_port(serve: Serve) -> None:
    srv = serve()
    with ws_client(srv.url + "?user_id=z") as ws:
        recv_text(ws)
        ws.send("sub:t")
        eventually(lambda: srv.stats().topics.get("t") == 1)
        assert http(srv.base, "GET", "/healthz")[0] == 200
        status, body = http(srv.base, "POST", "/api/publish", {"topic": "t", "data": "via api"})
        assert (status, json.loads(body)) == (200, {"delivered": 1})
        assert json.loads(recv_text(ws)) == {"topic": "t", "data": "via api"}
        status, body = http(srv.base, "GET", "/api/stats")
        assert status == 200
        stats = json.loads(body)
        assert stats["connections"] == 1 and stats["topics"] == {"t": 1}
        assert http(srv.base, "GET", "/nope")[0] == 404
        assert http(srv.base, "GET", "/api/publish")[0] == 405
        own = srv.stats()
        assert own.connections == 1 and own.topics == {"t": 1}
        assert own.messages_in == 1 and own.messages_out >= 2  # Hello, the publish
        assert own.http_requests >= 3


def test_an_http_request_then_half_close_still_gets_its_answer(serve: Serve) -> None:
    srv = serve()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # FIN right behind the request
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    eventually(lambda: srv.call(lambda s: s.core.connection_ids()) == ())


def test_a_peer_that_vanishes_is_reported_1006(serve: Serve) -> None:
    disconnects: list[ClientDisconnected] = []
    srv = serve(on_disconnect=disconnects.append)
    peer = RawPeer.open(srv.port, "/ws?user_id=gone")
    peer.recv_text()
    peer.close()  # no closing handshake
    eventually(lambda: disconnects)
    assert [(d.user_id, d.code) for d in disconnects] == [("gone", 1006)]
    assert srv.stats().connections == 0


def test_garbage_gets_1002_and_the_server_keeps_serving(serve: Serve) -> None:
    errors: list[ErrorOccurred] = []
    srv = serve(on_error=errors.append)
    bad = RawPeer.open(srv.port)
    bad.recv_text()
    bad.send(b"\xff\xff\xff\xff garbage")  # reserved bits, a bad opcode
    frames = bad.frames_until_eof()
    assert frames[-1][0] == OP_CLOSE and close_payload(frames[-1][1])[0] == 1002
    bad.close()
    with ws_client(srv.url) as good:
        assert recv_text(good).startswith("Hello, ")
    assert errors and errors[0].code == 1003  # the reference's "read error" event code


def test_debug_logging_traces_frames_in_and_out(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tank.frames"):
        srv = serve()  # tracing is decided as serving begins
        with ws_client(srv.url + "?user_id=dbg") as ws:
            recv_text(ws)
            ws.send("sub:news")
            eventually(lambda: srv.stats().topics.get("news") == 1)
            srv.call(lambda s: s.publish("news", "traced"))
            recv_text(ws)
        srv.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "tank.frames"]
    assert any("<- http GET /ws?user_id=dbg" in line for line in lines)
    assert any("-> http HTTP/1.1 101" in line for line in lines)
    assert any("-> text 'Hello, dbg!" in line for line in lines)
    assert any("<- text 'sub:news'" in line for line in lines)
    assert any("traced" in line and "->" in line for line in lines)
