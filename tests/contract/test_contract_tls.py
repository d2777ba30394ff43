"""The contract over TLS (issue 12, part 1): ``serve(..., ssl=context)`` on asyncio and trio serves
``wss://`` and the HTTP API over HTTPS on one port, with a certificate authority made by the test
(trustme); handshakes that fail cost the server nothing lasting. The selectors example has no TLS.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator

import pytest
import trustme
from contract_support import HOST, Serve, eventually, recv_text, ws_client

from tank_core import ServerConfig

TLS_TRANSPORTS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> Iterator[ssl.SSLContext]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    yield context


def https(base: str, path: str, context: ssl.SSLContext, body: object = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(request, timeout=5) as answer:
        return int(answer.status), bytes(answer.read())


@pytest.mark.parametrize("transport", TLS_TRANSPORTS)
def test_wss_serves_the_protocol_and_https_the_api(
    serve: Serve, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    srv = serve(ServerConfig(heartbeat_interval=30, heartbeat_timeout=60), ssl=server_context)
    assert srv.url.startswith(f"wss://{HOST}:")
    alice = ws_client(srv.url + "?user_id=alice", ssl=client_context)
    bob = ws_client(srv.url + "?user_id=bob", ssl=client_context)
    assert recv_text(alice) == "Hello, alice! Welcome to WebSocket server."
    assert recv_text(bob) == "Hello, bob! Welcome to WebSocket server."
    alice.send("sub:news")
    eventually(lambda: srv.stats().topics == {"news": 1})
    base = f"https://{HOST}:{srv.port}"
    assert https(base, "/api/publish", client_context, {"topic": "news", "data": "over tls"}) == (
        200, b'{"delivered":1}'
    )
    assert json.loads(recv_text(alice)) == {"topic": "news", "data": "over tls"}
    bob.send("hello alice")  # relayed
    assert recv_text(alice) == "hello alice"
    status, page = https(base, "/tank.js", client_context)
    assert status == 200 and b"TankWebSocket" in page
    alice.close()
    bob.close()


@pytest.mark.parametrize("transport", TLS_TRANSPORTS)
def test_a_client_that_does_not_trust_the_certificate_is_refused(
    serve: Serve, server_context: ssl.SSLContext
) -> None:
    srv = serve(ssl=server_context)
    with pytest.raises(ssl.SSLCertVerificationError):
        ws_client(srv.url, ssl=ssl.create_default_context())  # the system's CAs only
    eventually(lambda: srv.call(lambda s: s.core.connection_ids()) == ())


@pytest.mark.parametrize("transport", TLS_TRANSPORTS)
def test_failed_handshakes_cost_nothing_lasting(
    serve: Serve, server_context: ssl.SSLContext, client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(request_timeout=0.5, heartbeat_interval=30, heartbeat_timeout=60)
    srv = serve(config, ssl=server_context)
    with caplog.at_level(logging.DEBUG):
        # Plain HTTP on the TLS port, a garbage hello, and a client that says nothing at all.
        for junk in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b""):
            with socket.create_connection((HOST, srv.port), timeout=5) as sock:
                if junk:
                    sock.sendall(junk)
                sock.settimeout(3)
                started = time.monotonic()
                try:
                    while sock.recv(4096):
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
                assert time.monotonic() - started < 2.5  # closed by the server, within the timeout
        eventually(lambda: srv.call(lambda s: s.core.connection_ids()) == ())
        good = ws_client(srv.url + "?user_id=good", ssl=client_context)
        assert recv_text(good) == "Hello, good! Welcome to WebSocket server."
        good.close()
    assert srv.failure is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("transport", TLS_TRANSPORTS)
@pytest.mark.parametrize("client_backend", ["asyncio", "trio"])
def test_our_client_verifies_the_certificate_and_takes_ssl(
    serve: Serve, server_context: ssl.SSLContext, client_context: ssl.SSLContext,
    client_backend: str,
) -> None:
    srv = serve(ServerConfig(heartbeat_interval=30, heartbeat_timeout=60), ssl=server_context)

    async def hello(**tls: ssl.SSLContext) -> str:
        if client_backend == "asyncio":
            import tank_asyncio as adapter
        else:
            import tank_trio as adapter  # type: ignore[no-redef]
        async with adapter.connect(srv.url, user_id="c", reconnect=False, connect_timeout=3,
                                   **tls) as client:
            return str(client.user_id)

    def run(**tls: ssl.SSLContext) -> str:
        if client_backend == "asyncio":
            import asyncio
            return asyncio.run(hello(**tls))
        import trio
        return trio.run(lambda: hello(**tls))

    assert run(ssl=client_context) == "c"
    with pytest.raises(Exception) as refused:  # the system's authorities do not know ours
        run()
    assert "certificate verify failed" in str(refused.value) or "CERTIFICATE_VERIFY_FAILED" in repr(
        refused.value
    )
