"""Tools of the cluster suite: a real redis-server, `tank serve` nodes, and fast raw clients.

Everything runs on 127.0.0.1. Redis is Debian's ``redis-server`` (``install_redis.sh``), started on a
free port with no persistence in a temporary directory. Nodes are the real command line,
``python -m tank_cli serve --redis-url ... --backend X``. The clients are hand-written for speed:
a WebSocket subscriber that parses the server's unmasked frames in bulk (answering Pings), and an
HTTP client that pipelines API calls on one keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hiredis

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------- Redis


def redis_binary() -> str:
    """The redis-server executable, installed with apt-get (install_redis.sh) when missing."""
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists(
        "/usr/bin/redis-server") else None)
    if found is None:
        subprocess.run(["bash", str(HERE / "install_redis.sh")], check=True, timeout=600)
        found = shutil.which("redis-server") or "/usr/bin/redis-server"
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def encode(args: Sequence[bytes | str]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts += [b"$%d\r\n" % len(raw), raw, b"\r\n"]
    return b"".join(parts)


class RedisServer:
    """One redis-server process on a fixed loopback port; can be killed and started again."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = redis_binary()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def command(self, *args: bytes | str) -> Any:
        """One command on a fresh connection; the parsed reply."""
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(encode(args))
            reader = hiredis.Reader()
            while True:
                data = sock.recv(65536)
                if not data:
                    raise OSError("redis closed the connection")
                reader.feed(data)
                reply = reader.gets()
                if reply is not False:
                    return reply

    def numsub(self, channels: Sequence[str]) -> dict[str, int]:
        reply = self.command("PUBSUB", "NUMSUB", *channels)
        return {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}


# --------------------------------------------------------------------------------- nodes


class Node:
    """One `tank serve --redis-url ...` process."""

    def __init__(self, backend: str, redis_url: str | None, log_path: Path, *extra: str) -> None:
        self.backend = backend
        self.redis_url = redis_url
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def launch(self) -> None:
        cmd = [sys.executable, "-m", "tank_cli", "serve", "--host", HOST, "--port", "0",
               "--backend", self.backend, *self.extra]
        if self.redis_url is not None:
            cmd += ["--redis-url", self.redis_url]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=log)
        log.close()

    def await_serving(self, timeout: float = 20.0) -> Node:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"node did not start\n{self.log_tail()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"node exited {self.proc.poll()}\n{self.log_tail()}")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        assert line.startswith("tank: serving ws://") and f"(backend {self.backend})" in line, line
        self.port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"node did not stop on SIGTERM\n{self.log_tail()}") from None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "--- node log ---\n" + "\n".join(text.splitlines()[-lines:])

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def http(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"content-type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            try:
                return response.status, json.loads(raw)
            except ValueError:
                return response.status, raw.decode()
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        status, value = self.http("GET", "/api/stats")
        assert status == 200, value
        assert isinstance(value, dict)
        return value


def start_nodes(backends: Sequence[str], redis_url: str | None, log_dir: Path, *extra: str
                ) -> list[Node]:
    """Start the nodes in parallel; returns them serving."""
    nodes = [Node(b, redis_url, log_dir / f"node{i}-{b}.log", *extra) for i, b in enumerate(backends)]
    for node in nodes:
        node.launch()
    return [node.await_serving() for node in nodes]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


# --------------------------------------------------------------------------------- clients


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (the all-zero mask key: legal, and the payload stays as it is)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\x00\x00\x00\x00" + payload


class Subscriber(asyncio.Protocol):
    """A WebSocket client that records every topic message, per topic, in arrival order."""

    def __init__(self, user_id: str, topics: Sequence[str], timed: bool = False) -> None:
        self.user_id = user_id
        #: With ``timed``: (topic, data, arrival time) of every topic message.
        self.timed = timed
        self.arrivals: list[tuple[str, str, float]] = []
        self.topics = list(topics)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.by_topic: dict[str, list[str]] = {}
        self.texts: list[str] = []
        self.count = 0
        self.close_code: int | None = None
        self._handshaken = False
        self._hello = False

    @classmethod
    async def connect(cls, port: int, user_id: str, topics: Sequence[str], timed: bool = False
                      ) -> Subscriber:
        loop = asyncio.get_running_loop()
        _, sub = await loop.create_connection(lambda: cls(user_id, topics, timed), HOST, port)
        await asyncio.wait_for(sub.open, 10)
        return sub

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = (
            f"GET /ws?user_id={self.user_id} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(request.encode())  # type: ignore[union-attr]

    def send_text(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(text.encode()))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self._handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:100])
            del buf[: end + 4]
            self._handshaken = True
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self._text(payload.decode())
            elif opcode == 0x9:
                self.transport.write(client_frame(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.transport.write(client_frame(payload[:2], 0x8))  # type: ignore[union-attr]
        del buf[:pos]

    def _text(self, text: str) -> None:
        if not self._hello:
            self._hello = True
            for topic in self.topics:
                self.send_text("sub:" + topic)
            self.open.set_result(None)
            return
        if text == "heartbeat":
            return
        if text.startswith('{"topic":'):
            message = json.loads(text)
            self.by_topic.setdefault(message["topic"], []).append(message["data"])
            self.count += 1
            if self.timed:
                self.arrivals.append((message["topic"], message["data"], time.monotonic()))
        else:
            self.texts.append(text)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ApiClient:
    """One keep-alive HTTP connection, one call at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> ApiClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = json.loads(await self.reader.readexactly(length))
        assert isinstance(answer, dict)
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def pipeline(port: int, calls: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """POST every call on one keep-alive connection, all written at once (pipelined); the JSON
    answers, in order."""
    reader, writer = await asyncio.open_connection(HOST, port)
    parts = []
    for path, body in calls:
        data = json.dumps(body).encode()
        parts.append(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )

    async def write_all() -> None:
        for start in range(0, len(parts), 256):
            writer.write(b"".join(parts[start : start + 256]))
            await writer.drain()

    sender = asyncio.get_running_loop().create_task(write_all())
    answers: list[dict[str, Any]] = []
    try:
        for _ in calls:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            answers.append(json.loads(await reader.readexactly(length)))
        await sender
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answers
