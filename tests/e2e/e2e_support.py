"""Shared tools of the end-to-end suite: `tank serve` as a subprocess, HTTP calls, clients.

Everything talks to 127.0.0.1 only. The server under test is the real command line, started as
``python -m tank_cli serve --backend asyncio|trio`` (``TANK_E2E_SERVER`` may name another command
prefix, e.g. ``tank``), and found through the one line it prints once listening:
``tank: serving ws://HOST:PORT/PATH (backend NAME)`` (``wss://`` with ``--certfile/--keyfile``).

Over ``wss://`` every client trusts the certificate authority of ``Tls`` (made once per session by
trustme): the helpers here pick the right scheme and TLS context from the server or the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import select
import shlex
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent

# Short heartbeat settings keep the suite fast (issue 3, section 4).
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 0.6
CLOSE_TIMEOUT = 0.5

SERVE_LINE = re.compile(
    r"^tank: serving (?P<scheme>wss?)://(?P<host>[^/\s]+):(?P<port>\d+)(?P<path>/\S*)"
    r" \(backend (?P<backend>\w+)\)$"
)

T = TypeVar("T")


# --------------------------------------------------------------------------------- TLS


@dataclass
class Tls:
    """A certificate authority made by the test (trustme) and a server certificate it issued for
    127.0.0.1 and localhost, as PEM files for ``tank serve --certfile/--keyfile`` and for
    clients outside Python (``NODE_EXTRA_CA_CERTS``, Chromium's SPKI list)."""

    ca: Any  # trustme.CA
    certfile: Path
    keyfile: Path
    ca_file: Path
    spki_sha256: str  # base64 SHA-256 of the server certificate's SubjectPublicKeyInfo
    _client_context: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def make(cls, directory: Path) -> Tls:
        import base64
        import hashlib

        import trustme
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        ca = trustme.CA()
        cert = ca.issue_cert(HOST, "localhost")
        certfile, keyfile, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
        certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        keyfile.write_bytes(cert.private_key_pem.bytes())
        ca_file.write_bytes(ca.cert_pem.bytes())
        spki = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_key()
        der = spki.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        spki_sha256 = base64.b64encode(hashlib.sha256(der).digest()).decode()
        return cls(ca, certfile, keyfile, ca_file, spki_sha256)

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that verifies the server against the test's CA (only); one per
        session, shared by every client (loading the CA once)."""
        if self._client_context is None:
            self._client_context = ssl.create_default_context(cafile=str(self.ca_file))
        return self._client_context

    def server_context(self) -> ssl.SSLContext:
        """A server-side context with the same certificate (the tests' own page servers)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.keyfile)
        return context

    @property
    def serve_args(self) -> list[str]:
        return ["--certfile", str(self.certfile), "--keyfile", str(self.keyfile)]


def ws_only(reason: str) -> Callable[[T], T]:
    """Run a test over ``ws://`` only (it is about something TLS takes away); README.md lists it.
    The test is parametrized on ``scheme=ws`` alone: never skipped, never xfailed over ``wss``."""
    assert reason

    def mark(test: T) -> T:
        marked: T = pytest.mark.ws_only(reason)(pytest.mark.parametrize("scheme", ["ws"])(test))
        return marked

    return mark


def chromium_tls_flags(tls: Tls | None) -> list[str]:
    """Chromium accepts the test's server certificate (and no other unknown one) by its key."""
    return [] if tls is None else [f"--ignore-certificate-errors-spki-list={tls.spki_sha256}"]


def serve_https(server: Any, tls: Tls | None) -> str:
    """Make a test's own ``http.server`` speak HTTPS with the server certificate when ``tls`` is
    set (before it serves); its scheme. The TLS handshake happens in the handler's thread."""
    if tls is None:
        return "http"
    server.socket = tls.server_context().wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    return "https"


#: Set once per session by the ``tls`` fixture (conftest.py) when a ``wss`` test first needs it.
TLS: Tls | None = None


def client_ssl(url: str) -> ssl.SSLContext | None:
    """The client context for ``url``: the test CA's for ``wss://`` and ``https://``, else None."""
    if not url.startswith(("wss://", "https://")):
        return None
    assert TLS is not None, "a wss:// or https:// URL, but no test CA (the `tls` fixture)"
    return TLS.client_context()


def server_command() -> list[str]:
    override = os.environ.get("TANK_E2E_SERVER")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "tank_cli"]


# Client connections opened inside ``run``: dropped when the test body ends, so that a server
# stopped at teardown does not wait its close timeout for peers that are gone with their loop.
_live: list[Any] = []


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test's asyncio body with a hard bound on its duration."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            while _live:
                transport = _live.pop().transport
                if transport is not None:
                    transport.abort()
            await asyncio.sleep(0)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------------- the server

#: The ``start_server`` fixture: ``start_server("--no-relay", port=p, heartbeat=(i, t))``.
StartServer = Callable[..., "TankProcess"]


@dataclass
class TankProcess:
    """One `tank serve` subprocess."""

    backend: str
    args: list[str]
    log_path: Path
    port: int = 0
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    host: str = HOST
    path: str = "/ws"
    serving_line: str = ""
    started_at: float = 0.0
    api_key: str | None = None  # sent by the API helpers below when set
    returncode: int | None = None
    extra_stdout: bytes = b""
    tls: Tls | None = None  # serve wss:// (and HTTPS) with its certificate
    scheme: str = "ws"  # as printed on the serving line
    _log: Any = field(default=None, repr=False)

    # -- lifecycle

    def start(self, timeout: float = 15.0) -> TankProcess:
        cmd = [
            *server_command(), "serve", "--host", HOST, "--port", str(self.port),
            "--backend", self.backend, *(self.tls.serve_args if self.tls else []), *self.args,
        ]
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._log.write(f"$ {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._log,
        )
        line = self._read_line(timeout)
        match = SERVE_LINE.match(line)
        if match is None:
            self.kill()
            raise AssertionError(
                f"`tank serve` did not print its serving line; got {line!r}\n{self.log_tail()}"
            )
        self.serving_line = line
        self.scheme = match["scheme"]
        assert self.scheme == ("wss" if self.tls else "ws"), line
        self.host = match["host"]
        self.port = int(match["port"])
        self.path = match["path"]
        assert match["backend"] == self.backend, line
        return self

    def _read_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return buf.decode(errors="replace") + " [timed out]"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return buf.decode(errors="replace") + f" [exited {self.proc.poll()}]"
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        self.extra_stdout = rest
        return line.decode(errors="replace").rstrip("\r")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            self._reap()
            raise AssertionError(
                f"`tank serve` did not exit within {timeout} s\n{self.log_tail()}"
            ) from None
        self._reap()
        return rc

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Graceful stop; returns the exit code (the caller asserts on it)."""
        if self.running:
            self.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.returncode
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.extra_stdout += self.proc.stdout.read() or b""
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "--- server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- addresses

    @property
    def ws_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"

    @property
    def http_base(self) -> str:
        """``http://HOST:PORT`` or ``https://HOST:PORT``: the API, ``/tank.js``, the status page."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def client_context(self) -> ssl.SSLContext | None:
        """What a client needs to trust this server: None over plain TCP."""
        return self.tls.client_context() if self.tls else None

    def http_connection(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        """A fresh HTTP/1.1 connection to the server (HTTPS over TLS); not yet connected."""
        return _http_connection(self.port, self.client_context(), timeout)

    def url(self, user_id: str | None = None) -> str:
        if user_id is None:
            return self.ws_url
        from urllib.parse import quote

        return f"{self.ws_url}?user_id={quote(user_id, safe='')}"

    # -- HTTP API

    def http(
        self,
        method: str,
        target: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpAnswer:
        if self.api_key is not None:
            headers = {"Authorization": f"apikey {self.api_key}", **(headers or {})}
        return http_request(self.port, method, target, body, headers, context=self.client_context())

    def publish(self, topic: str, data: str, **kw: Any) -> int:
        answer = self.http("POST", "/api/publish", {"topic": topic, "data": data}, **kw)
        assert answer.status == 200, answer
        return int(answer.json()["delivered"])

    def broadcast(self, data: str, **kw: Any) -> int:
        answer = self.http("POST", "/api/broadcast", {"data": data}, **kw)
        assert answer.status == 200, answer
        return int(answer.json()["delivered"])

    def disconnect(self, user_id: str, **kw: Any) -> int:
        answer = self.http("POST", "/api/disconnect", {"user_id": user_id}, **kw)
        assert answer.status == 200, answer
        return int(answer.json()["closed"])

    def stats(self, **kw: Any) -> dict[str, Any]:
        answer = self.http("GET", "/api/stats", **kw)
        assert answer.status == 200, answer
        value = answer.json()
        assert isinstance(value, dict)
        return value

    async def apublish(self, topic: str, data: str) -> int:
        return await asyncio.to_thread(self.publish, topic, data)

    async def abroadcast(self, data: str) -> int:
        return await asyncio.to_thread(self.broadcast, data)

    async def adisconnect(self, user_id: str) -> int:
        return await asyncio.to_thread(self.disconnect, user_id)

    async def astats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.stats)

    async def await_stats(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 3.0, what: str = ""
    ) -> dict[str, Any]:
        """Poll /api/stats until ``predicate`` holds; fail with the last snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = await self.astats()
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"stats never satisfied {what or predicate}: {snapshot}")
            await asyncio.sleep(0.02)


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    *,
    context: ssl.SSLContext | None = None,
) -> HttpAnswer:
    """One HTTP/1.1 request over a fresh connection (no proxies, no redirects); HTTPS when a
    client TLS ``context`` is given."""
    if isinstance(body, dict):
        payload: bytes | None = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    elif isinstance(body, str):
        payload = body.encode()
    else:
        payload = body
    conn = _http_connection(port, context, timeout)
    try:
        conn.request(method, target, body=payload, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return HttpAnswer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, data
        )
    finally:
        conn.close()


def _http_connection(
    port: int, context: ssl.SSLContext | None, timeout: float
) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection(HOST, port, timeout=timeout)
    return http.client.HTTPSConnection(HOST, port, timeout=timeout, context=context)


# --------------------------------------------------------------------------------- websockets client


class _TrackedConnection(ClientConnection):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        _live.append(self)


def ws_connect(url: str, **kw: Any) -> Any:
    """`websockets` client with test-friendly defaults: no proxy, no client pings, unbounded queue;
    over ``wss://`` it trusts the test's CA."""
    if url.startswith("wss://"):
        kw.setdefault("ssl", client_ssl(url))
    kw.setdefault("create_connection", _TrackedConnection)
    kw.setdefault("proxy", None)
    kw.setdefault("ping_interval", None)
    kw.setdefault("max_queue", None)
    kw.setdefault("open_timeout", 5)
    kw.setdefault("close_timeout", 3)
    return websockets.connect(url, **kw)


def hello(user_id: str) -> str:
    return f"Hello, {user_id}! Welcome to WebSocket server."


async def recv_data(ws: ClientConnection, timeout: float = 3.0) -> str | bytes:
    """The next message that is not the server's text ``heartbeat``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no data message within {timeout} s")
        try:
            message = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            raise AssertionError(f"no data message within {timeout} s") from None
        if message != "heartbeat":
            return message


async def expect_next(ws: ClientConnection, expected: str | bytes, timeout: float = 3.0) -> None:
    got = await recv_data(ws, timeout)
    assert got == expected, f"expected {expected!r}, got {got!r}"


async def connect_hello(url: str, user_id: str | None = None, **kw: Any) -> ClientConnection:
    """Open a connection and consume (and check) its Hello frame."""
    ws: ClientConnection = await ws_connect(url, **kw)
    first = await asyncio.wait_for(ws.recv(), 3)
    assert isinstance(first, str)
    if user_id is not None:
        assert first == hello(user_id)
    else:
        assert first.startswith("Hello, ") and first.endswith("! Welcome to WebSocket server.")
    return ws


async def wait_closed_code(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Drain until the connection is closed; the close code and reason the server sent."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout} s")
            try:
                await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                raise AssertionError(f"connection still open after {timeout} s") from None
    return ws.close_code, ws.close_reason


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 3.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------- raw sockets

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """One hand-made frame, masked as a client must (unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    masked = bytes(b ^ mask_key[i % 4] for i, b in enumerate(payload))
    return head + mask_key + masked


def close_payload(code: int | None, reason: str = "") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    at: float  # time.monotonic() when fully read

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode()


class RawClient:
    """A WebSocket peer made of asyncio streams and hand-made frames: it misbehaves on request.

    Over ``wss://`` the streams are TLS (asyncio's, verifying the server against the test's CA):
    the frames are the same bytes, inside TLS records."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        _live.append(self)
        self.status: int | None = None
        self.response_head = b""
        self.response_headers: dict[str, str] = {}
        self.last_sent = time.monotonic()

    @classmethod
    async def open(cls, server: TankProcess, *, rcvbuf: int | None = None) -> RawClient:
        """A TCP connection to ``server`` (TLS for a ``wss://`` server), nothing sent yet."""
        context = server.client_context()
        tls: dict[str, Any] = {} if context is None else {
            "ssl": context, "server_hostname": HOST, "ssl_handshake_timeout": 5,
        }
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection(HOST, server.port, limit=1 << 22, **tls)
        else:
            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22, **tls)
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls,
        server: TankProcess,
        path: str = "/ws",
        user_id: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        expect_hello: bool = True,
    ) -> RawClient:
        """Open and upgrade; checks the 101 and (by default) reads the Hello frame."""
        client = await cls.open(server, rcvbuf=rcvbuf)
        target = path if user_id is None else f"{path}?user_id={user_id}"
        status = await client.handshake(target, headers)
        assert status == 101, client.response_head
        if expect_hello:
            first = await client.read_frame()
            assert first.opcode == OP_TEXT and first.payload.startswith(b"Hello, "), first
        return client

    async def send_raw(self, data: bytes) -> None:
        # Taken before the write: the server cannot have received the bytes any earlier.
        self.last_sent = time.monotonic()
        self.writer.write(data)
        await self.writer.drain()

    async def handshake(self, target: str = "/ws", headers: dict[str, str] | None = None) -> int:
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {HOST}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {KEY}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.response_head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status_line = self.response_head.split(b"\r\n", 1)[0]
        self.status = int(status_line.split()[1])
        self.response_headers = {}
        for line in self.response_head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.response_headers[name.strip().lower()] = value.strip()
        if self.status == 101:
            assert self.response_headers.get("sec-websocket-accept") == ACCEPT, self.response_head
        return self.status

    async def send_frame(self, opcode: int, payload: bytes = b"", **kw: Any) -> None:
        await self.send_raw(frame(opcode, payload, **kw))

    async def send_text(self, text: str) -> None:
        await self.send_frame(OP_TEXT, text.encode())

    async def read_frame(self, timeout: float = 3.0) -> Frame:
        async def read() -> Frame:
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "the server masked a frame"
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(n)
            assert b0 & 0x0F != OP_BINARY, "the server sent a binary frame (PROTOCOL.md: text only)"
            assert not b0 & 0x70, "the server set a reserved bit"
            return Frame(bool(b0 & 0x80), b0 & 0x0F, payload, time.monotonic())

        return await asyncio.wait_for(read(), timeout)

    async def read_until_close(
        self, timeout: float = 5.0, *, answer_pings: bool = False
    ) -> tuple[Frame, list[Frame]]:
        """Read frames until the server's Close; returns it and everything before it."""
        deadline = time.monotonic() + timeout
        seen: list[Frame] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no Close within {timeout} s; got {seen[-5:]}")
            try:
                got = await self.read_frame(left)
            except TimeoutError:
                raise AssertionError(f"no Close within {timeout} s; got {seen[-5:]}") from None
            if got.opcode == OP_CLOSE:
                return got, seen
            if answer_pings and got.opcode == OP_PING:
                await self.send_frame(OP_PONG, got.payload)
            seen.append(got)

    async def read_data(self, timeout: float = 3.0) -> Frame:
        """The next data frame that is not the text heartbeat, answering pings."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.read_frame(max(0.01, deadline - time.monotonic()))
            if got.opcode == OP_PING:
                await self.send_frame(OP_PONG, got.payload)
                continue
            if got.opcode == OP_TEXT and got.payload == b"heartbeat":
                continue
            return got

    async def at_eof(self, timeout: float = 3.0) -> bool:
        """True once the server closed TCP (after any remaining bytes); over TLS, once it closed
        the TLS connection (close_notify) or the socket under it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError):
                return True
            if not data:
                return True
        return False

    def stop_reading(self) -> None:
        """Stop reading the socket, so the kernel buffers fill and the server's outbox grows."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        self.writer.transport.resume_reading()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Vanish: RST, no Close frame."""
        import socket

        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1)


# --------------------------------------------------------------------------------- the Node client

REPLAY = E2E_DIR / "node" / "tank_client_replay.js"
NODE_MODULES = E2E_DIR / "node" / "node_modules"


class NodeClient:
    """The replay script as a subprocess: JSON commands in, JSON events out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, url: str) -> NodeClient:
        node = shutil.which("node")
        assert node, "node is not installed (run tests/e2e/install_deps.sh)"
        assert (NODE_MODULES / "ws").is_dir(), "ws is not installed (run tests/e2e/install_deps.sh)"
        env = dict(os.environ)
        if url.startswith("wss://"):  # Node's own store plus the test's CA (read at start)
            assert TLS is not None
            env["NODE_EXTRA_CA_CERTS"] = str(TLS.ca_file)
        proc = await asyncio.create_subprocess_exec(
            node, str(REPLAY), url, cwd=REPLAY.parent, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = cls(proc)
        await client.wait_event(lambda e: e["ev"] == "ready", what="ready")
        return client

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self.changed.set()

    async def command(self, cmd: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()

    async def wait_event(
        self, predicate: Any, *, start: int = 0, timeout: float = 5.0, what: str = ""
    ) -> int:
        """Index of the first event at or after ``start`` matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.events)):
                if predicate(self.events[i]):
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"node client: no {what or 'matching'} event within {timeout} s; "
                    f"last events {self.events[-8:]}"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    def since(self, start: int, ev: str) -> list[dict[str, Any]]:
        return [e for e in self.events[start:] if e["ev"] == ev]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.command("exit")
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()
