"""The adapter contract suite's harness: one Tank server per test, of a given transport, on
127.0.0.1:0 in a background thread with its own loop, driven from the test thread by real clients.

- ``Served.start(transport, config, hooks)`` runs ``tank_asyncio.serve`` under ``asyncio.run``,
  ``tank_trio.serve`` under ``trio.run``, or the example's ``SelectorsServer.serve_forever``;
- ``served.call(fn)`` runs ``fn(server)`` on the server's thread (``loop.call_soon_threadsafe``,
  ``trio.from_thread.run_sync``, ``SelectorsServer.call_soon``) and returns its result or raises
  its exception: the server object is touched on its own thread only, while it runs;
- ``served.stop()`` stops it the way its ecosystem does (asyncio: leave the ``async with`` block;
  trio: cancel the scope running ``serve``; selectors: ``shutdown()``), joins the thread, returns
  how long that took and re-raises a failure of the server; ``served.request_shutdown()`` calls
  the adapter's ``shutdown()`` instead, without waiting;
- clients: ``ws_client`` (the ``websockets`` sync client, which answers Pings and Closes on its
  own), ``RawPeer`` (a WebSocket client on a plain socket, for peers that misbehave), ``http``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import importlib.util
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import trio
from websockets.sync.client import ClientConnection, connect

import tank_asyncio
import tank_trio
from tank_core import ServerConfig

T = TypeVar("T")

TRANSPORTS = ("asyncio", "trio", "selectors")
HOST = "127.0.0.1"
#: Default heartbeat, short close timeout: a test that leaves a peer unanswered ends quickly.
QUICK = ServerConfig(close_timeout=0.3)
#: Fast heartbeats (PROTOCOL.md's rules at a tenth of the scale).
FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.3)
HELLO = "Hello, {}! Welcome to WebSocket server."
SHUTDOWN_TEXT = "Server is shutting down"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "selectors_server.py"

#: The ``serve`` fixture: ``serve(config=QUICK, **hooks) -> Served``.
Serve = Callable[..., "Served"]

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def selectors_example() -> ModuleType:
    """``examples/selectors_server.py`` as a module (shared with tests/examples if loaded there)."""
    module = sys.modules.get("selectors_server")
    if module is not None and getattr(module, "__file__", None) == str(EXAMPLE):
        return module
    spec = importlib.util.spec_from_file_location("selectors_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _unwrap(exc: BaseException) -> BaseException:
    """trio's nurseries wrap a lone failure in an exception group: the failure itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------------- the server in a thread


class Served:
    """One running server of one transport (see the module header)."""

    transport = ""

    def __init__(self, config: ServerConfig | None, hooks: dict[str, Any]) -> None:
        self.config = config
        self.hooks = hooks
        self.server: Any = None
        self.failure: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._target, name=f"tank-{self.transport}", daemon=True)
        self._reported = False

    @staticmethod
    def start(transport: str, config: ServerConfig | None, hooks: dict[str, Any]) -> Served:
        kinds: dict[str, type[Served]] = {
            "asyncio": _AsyncioServed, "trio": _TrioServed, "selectors": _SelectorsServed,
        }
        served = kinds[transport](config, hooks)
        served._thread.start()
        if not served._ready.wait(10):
            raise AssertionError(f"the {transport} server did not start")
        if served.server is None:  # it failed before listening (ConfigError...)
            served._thread.join(5)
            served._reported = True
            assert served.failure is not None
            raise served.failure
        return served

    # ------------------------------------------------------------------ where it listens

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def base(self) -> str:
        """The HTTP API's base URL."""
        return f"http://{HOST}:{self.port}"

    # ------------------------------------------------------------------ on the server's thread

    def call(self, fn: Callable[[Any], T], timeout: float = 5.0) -> T:
        """``fn(server)`` on the server's thread: its result, or its exception raised here."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.server))
                except BaseException as exc:
                    future.set_exception(exc)

        self._soon(run)
        return future.result(timeout)

    def stats(self) -> Any:
        return self.call(lambda s: s.stats())

    def nap(self, seconds: float) -> Coroutine[Any, Any, None]:
        """What a coroutine hook awaits to let time pass on this loop (the selectors example has
        no loop: its coroutine hooks must finish without suspending, so there it returns at once)."""
        return _no_nap(seconds)

    # ------------------------------------------------------------------ stopping

    def request_shutdown(self) -> None:
        """Call the adapter's ``shutdown()`` on its thread, without waiting for it."""
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> float:
        """Graceful stop, the ecosystem's way; the thread joined; a server failure re-raised.
        Returns the seconds from asking to the thread's end."""
        started = time.monotonic()
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # it is ending on its own
                self._request_stop()
        return self.wait_stopped(timeout, started)

    def wait_stopped(self, timeout: float = 10.0, started: float | None = None) -> float:
        """Wait for the thread to end (after a shutdown or a failure); re-raise a failure."""
        started = time.monotonic() if started is None else started
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the {self.transport} server did not stop within {timeout} s")
        elapsed = time.monotonic() - started
        if self.failure is not None and not self._reported:
            self._reported = True
            raise self.failure
        return elapsed

    # ------------------------------------------------------------------ per transport

    def _target(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failure = _unwrap(exc)
        finally:
            self._ready.set()

    def _run(self) -> None:
        raise NotImplementedError

    def _soon(self, fn: Callable[[], None]) -> None:
        raise NotImplementedError

    def _request_stop(self) -> None:
        raise NotImplementedError


async def _no_nap(seconds: float) -> None:
    return None


class _AsyncioServed(Served):
    transport = "asyncio"

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._leave = asyncio.Event()
        async with tank_asyncio.serve(self.config, HOST, 0, **self.hooks) as server:
            self.server = server
            self._ready.set()
            closed = asyncio.ensure_future(server.wait_closed())
            leave = asyncio.ensure_future(self._leave.wait())
            await asyncio.wait({closed, leave}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            leave.cancel()
        # leaving the block: a graceful shutdown (and a failure re-raised)

    def _soon(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def _request_stop(self) -> None:
        self._loop.call_soon_threadsafe(self._leave.set)

    def request_shutdown(self) -> None:
        with contextlib.suppress(RuntimeError):
            shutdown = self.server.shutdown()
            try:
                asyncio.run_coroutine_threadsafe(shutdown, self._loop)
            except RuntimeError:
                shutdown.close()
                raise

    def nap(self, seconds: float) -> Coroutine[Any, Any, None]:
        return asyncio.sleep(seconds)


class _TrioServed(Served):
    transport = "trio"

    def _run(self) -> None:
        trio.run(self._main)

    _cancelled = False

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._scope = trio.CancelScope()
        with self._scope:
            async with trio.open_nursery() as nursery:
                self.server = await nursery.start(
                    functools.partial(tank_trio.serve, self.config, HOST, 0, **self.hooks)
                )
                self._ready.set()
        # serve() returned after shutdown(), or the scope was cancelled: a graceful shutdown,
        # then the cancellation let through (trio's rule: never swallowed, never a group).
        if self._cancelled and not self._scope.cancelled_caught:
            raise AssertionError("serve() swallowed the cancellation of the scope running it")
        if not self._cancelled and self._scope.cancelled_caught:
            raise AssertionError("serve() was cancelled although nobody cancelled it")

    def call(self, fn: Callable[[Any], T], timeout: float = 5.0) -> T:
        return trio.from_thread.run_sync(fn, self.server, trio_token=self._token)

    def _soon(self, fn: Callable[[], None]) -> None:
        self._token.run_sync_soon(fn)

    def _request_stop(self) -> None:
        self._cancelled = True
        try:
            self._token.run_sync_soon(self._scope.cancel)
        except trio.RunFinishedError as exc:
            raise RuntimeError("the trio run is over") from exc

    def request_shutdown(self) -> None:
        def shut() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run(self.server.shutdown, trio_token=self._token)

        threading.Thread(target=shut, daemon=True).start()

    def nap(self, seconds: float) -> Coroutine[Any, Any, None]:
        return trio.sleep(seconds)


class _SelectorsServed(Served):
    transport = "selectors"

    def __init__(self, config: ServerConfig | None, hooks: dict[str, Any]) -> None:
        super().__init__(config, hooks)
        self._module = selectors_example()

    def _run(self) -> None:
        self.server = self._module.SelectorsServer(self.config, HOST, 0, **self.hooks)
        self._ready.set()
        self.server.serve_forever()

    def _soon(self, fn: Callable[[], None]) -> None:
        self.server.call_soon(fn)

    def _request_stop(self) -> None:
        self.server.shutdown()

    def request_shutdown(self) -> None:
        self.server.shutdown()


# ---------------------------------------------------------------------- clients


def ws_client(url: str, **kwargs: Any) -> ClientConnection:
    """A ``websockets`` sync client: it answers Pings and the server's Close on its own."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("max_queue", None)
    return connect(url, proxy=None, compression=None, legacy=True, **kwargs)


def recv_text(ws: ClientConnection, timeout: float = 5.0) -> str:
    """The next text message that is not the reference's text ``heartbeat``."""
    while True:
        message = ws.recv(timeout=timeout)
        assert isinstance(message, str), message
        if message != "heartbeat":
            return message


def eventually(check: Callable[[], object], timeout: float = 5.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def http(base: str, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    """One HTTP request with urllib (no proxy: the API answers loopback callers only)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (RFC 6455 §5.3: client frames are masked)."""
    key = os.urandom(4)
    head = bytes((0x80 | opcode,))
    length = len(payload)
    if length < 126:
        head += bytes((0x80 | length,))
    elif length < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", length)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", length)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def upgrade_request(port: int, target: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawPeer:
    """A WebSocket client on a plain blocking socket: it answers nothing unless told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.pings = 0

    @classmethod
    def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawPeer:
        """A TCP connection that has sent nothing yet."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect((HOST, port))
        return cls(sock)

    @classmethod
    def open(cls, port: int, target: str = "/ws", *, rcvbuf: int | None = None,
             after: bytes = b"") -> RawPeer:
        """Upgraded (``after`` goes in the same write as the request); the 101 read."""
        peer = cls.connect(port, rcvbuf=rcvbuf)
        peer.sock.sendall(upgrade_request(port, target) + after)
        head = peer.read_head()
        assert head.startswith(b"HTTP/1.1 101"), head
        return peer

    def read_head(self, timeout: float = 5.0) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._fill(timeout)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def _fill(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        self.send(masked_frame(OP_TEXT, text.encode()))

    def send_close(self, code: int = 1000) -> None:
        self.send(masked_frame(OP_CLOSE, struct.pack("!H", code)))

    def next_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next complete (unmasked, unfragmented) frame from the server: (opcode, payload)."""
        while True:
            frame = _parse(self.buffer)
            if frame is not None:
                opcode, payload, used = frame
                self.buffer = self.buffer[used:]
                if opcode == OP_PING:
                    self.pings += 1
                return opcode, payload
            self._fill(timeout)

    def recv_text(self, timeout: float = 5.0, *, pong: bool = False) -> str:
        """The next text message (not ``heartbeat``), skipping (or answering) Pings."""
        while True:
            opcode, payload = self.next_frame(timeout)
            if opcode == OP_TEXT and payload != b"heartbeat":
                return payload.decode()
            if opcode == OP_PING and pong:
                self.send(masked_frame(OP_PONG, payload))
            assert opcode != OP_CLOSE, f"closed while waiting for a message: {payload!r}"

    def frames_until_eof(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Every frame until the server drops TCP."""
        frames = []
        while True:
            try:
                frames.append(self.next_frame(timeout))
            except (EOFError, ConnectionResetError):
                return frames

    def until_close(self, timeout: float = 5.0) -> tuple[list[str], int, str]:
        """Texts received until the server's Close: (texts, code, reason)."""
        texts = []
        while True:
            opcode, payload = self.next_frame(timeout)
            if opcode == OP_TEXT:
                texts.append(payload.decode())
            elif opcode == OP_CLOSE:
                return texts, *close_payload(payload)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server has dropped TCP (whatever was still on its way is discarded)."""
        self.buffer = b""
        try:
            while True:
                self._fill(timeout)
                self.buffer = b""
        except (EOFError, ConnectionResetError):
            return True

    def close(self) -> None:
        self.sock.close()


def close_payload(payload: bytes) -> tuple[int, str]:
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode()


def _parse(data: bytes) -> tuple[int, bytes, int] | None:
    if len(data) < 2:
        return None
    opcode, length, pos = data[0] & 0x0F, data[1] & 0x7F, 2
    assert data[0] & 0x80, "the server sends unfragmented frames"
    assert not data[1] & 0x80, "server frames are never masked"
    if length == 126:
        if len(data) < 4:
            return None
        (length,) = struct.unpack_from("!H", data, 2)
        pos = 4
    elif length == 127:
        if len(data) < 10:
            return None
        (length,) = struct.unpack_from("!Q", data, 2)
        pos = 10
    if len(data) < pos + length:
        return None
    return opcode, data[pos : pos + length], pos + length
