"""``examples/selectors_server.py``, the stdlib custom transport: run as ``tank serve`` would be (a
process, real clients, signals, exit codes) and in-process in a thread (``call_soon``, hooks,
backpressure)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.util
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "selectors_server.py"
URL_LINE = re.compile(r"^tank: serving (ws://127\.0\.0\.1:(\d+)/ws) \(backend selectors\)$")
UPGRADE = (
    b"GET /ws?user_id=raw HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
QUIET = ("--heartbeat-interval", "30", "--heartbeat-timeout", "60")  # no heartbeat texts


def run(coro: Coroutine[Any, Any, None], timeout: float = 15.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def client(url: str) -> ClientConnection:
    return await connect(url, proxy=None, open_timeout=5, ping_interval=None)


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), 5)


def http(base: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One API call (no proxy: the API answers loopback callers only when no key is set)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if data is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as answer:
        return answer.status, json.loads(answer.read())


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked frame in ``data``."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        if pos + length > len(data):
            break
        out.append((opcode, data[pos : pos + length]))
        pos += length
    return out


class Served:
    """The example as a process, after it announced its URL."""

    def __init__(self, process: asyncio.subprocess.Process, line: str) -> None:
        self.process = process
        match = URL_LINE.match(line)
        assert match is not None, line
        self.url = match.group(1)
        self.port = int(match.group(2))
        self.base = f"http://127.0.0.1:{self.port}"

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
        self.process.send_signal(signum)
        _out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, err.decode()


async def start(*argv: str) -> Served:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--port", "0", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    raw = await asyncio.wait_for(process.stdout.readline(), 10)
    if not raw:
        _out, err = await process.communicate()
        raise AssertionError(f"the example exited {process.returncode}: {err.decode()}")
    return Served(process, raw.decode().rstrip("\n"))


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- the process


def test_it_serves_hello_publish_and_relay_then_sigterm_says_goodbye() -> None:
    async def main() -> None:
        served = await start(*QUIET, "--close-timeout", "5")
        a = await client(served.url + "?user_id=alice")
        b = await client(served.url + "?user_id=bob")
        assert await recv(a) == "Hello, alice! Welcome to WebSocket server."
        assert await recv(b) == "Hello, bob! Welcome to WebSocket server."

        await a.send("sub:news")
        await eventually(lambda: http(served.base, "GET", "/api/stats")[1]["topics"] == {"news": 1})
        answer = await asyncio.to_thread(
            http, served.base, "POST", "/api/publish", {"topic": "news", "data": "hi"})
        assert answer == (200, {"delivered": 1})
        assert json.loads(await recv(a)) == {"topic": "news", "data": "hi"}

        await a.send("from alice")  # relayed to everyone else, never back to the sender
        assert await recv(b) == "from alice"
        await b.send("from bob")
        assert await recv(a) == "from bob"

        started = time.monotonic()
        code, err = await served.stop(signal.SIGTERM)
        assert code == 0, err
        # The clients answer the Close at once: nothing waits for close_timeout (5 s).
        assert time.monotonic() - started < 2
        for ws in (a, b):
            assert await recv(ws) == "Server is shutting down"
            with pytest.raises(ConnectionClosed):
                await recv(ws)
            assert ws.close_code == 1001

    run(main())


def test_sigint_shuts_down_gracefully_and_exits_0() -> None:
    async def main() -> None:
        served = await start(*QUIET, "--close-timeout", "5")
        ws = await client(served.url)
        await recv(ws)
        started = time.monotonic()
        code, err = await served.stop(signal.SIGINT)
        assert code == 0, err
        assert time.monotonic() - started < 2
        assert await recv(ws) == "Server is shutting down"
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1001

    run(main())


def test_a_silent_socket_is_closed_1011_after_the_heartbeat_timeout() -> None:
    async def main() -> None:
        served = await start("--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6",
                             "--close-timeout", "0.3")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(UPGRADE)  # then never a byte more: no Pong, no Close
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 5)  # until the server drops TCP
        elapsed = time.monotonic() - started
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        received = frames(body)
        assert received[0] == (0x1, b"Hello, raw! Welcome to WebSocket server.")
        assert any(opcode == 0x9 for opcode, _ in received)  # Pings it never answered
        assert received[-1] == (0x8, struct.pack("!H", 1011) + b"heartbeat timeout")
        assert 0.6 <= elapsed < 3
        writer.close()
        code, err = await served.stop()
        assert code == 0, err

    run(main())


def test_shutdown_gives_up_on_a_peer_that_never_answers_its_close() -> None:
    async def main() -> None:
        served = await start(*QUIET, "--close-timeout", "0.3")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(UPGRADE)  # then it reads, but never answers the Close
        hello = b"Hello, raw! Welcome to WebSocket server."
        data = await asyncio.wait_for(reader.readuntil(hello), 5)
        started = time.monotonic()
        code, err = await served.stop(signal.SIGTERM)
        assert code == 0, err
        assert time.monotonic() - started < 0.3 + 0.5 + 1.0  # close_timeout + the session's slack
        data += await asyncio.wait_for(reader.read(), 5)
        assert frames(data.partition(b"\r\n\r\n")[2]) == [
            (0x1, hello),
            (0x1, b"Server is shutting down"),
            (0x8, struct.pack("!H", 1001) + b"server shutdown"),
        ]
        writer.close()

    run(main())


def test_a_bad_flag_is_one_line_on_stderr_and_exit_2() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE), "--port", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "selectors_server: error: " in done.stderr


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("selectors_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "--port"),
        (["--heartbeat-interval", "-1"], "heartbeat_interval"),
        (["--close-timeout", "nan"], "close_timeout"),
        (["--heartbeat-timeout", "1", "--heartbeat-interval", "5"], "heartbeat_timeout"),
        (["--redis-url", "http://x"], "Redis URL"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_values_are_refused_before_listening(
    example: ModuleType, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        example.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


# ---------------------------------------------------------------------- in-process, in a thread


@contextlib.contextmanager
def serving(example: ModuleType, config: Any = None, **hooks: Any) -> Iterator[Any]:
    server = example.SelectorsServer(config, "127.0.0.1", 0, **hooks)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="selectors-server")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        assert not failure, failure


def on_loop(server: Any, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, computed on the server's thread (the core is not thread-safe)."""
    result: concurrent.futures.Future[Any] = concurrent.futures.Future()
    server.call_soon(lambda: result.set_result(fn()))
    return result.result(5)


def test_in_a_thread_hooks_get_the_server_and_call_soon_is_the_way_in(example: ModuleType) -> None:
    def on_message(event: Any, server: Any) -> None:  # two parameters: (event, server)
        server.publish("echo", event.text)  # on the loop's thread: allowed as is

    with serving(example, on_message=on_message) as server:
        assert server.url.startswith("ws://127.0.0.1:") and server.port != 0

        async def main() -> None:
            ws = await client(server.url + "?user_id=t")
            assert await recv(ws) == "Hello, t! Welcome to WebSocket server."
            await ws.send("sub:echo")
            await ws.send("hello")
            assert json.loads(await recv(ws)) == {"topic": "echo", "data": "hello"}
            server.call_soon(lambda: server.broadcast("from another thread"))
            assert await recv(ws) == "from another thread"
            server.shutdown()
            assert await recv(ws) == "Server is shutting down"
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1001

        run(main())


def test_a_reader_that_stops_is_a_slow_consumer_and_the_others_get_everything(
    example: ModuleType,
) -> None:
    from tank_core import ServerConfig

    config = ServerConfig(max_outbox_bytes=256 * 1024, max_message_size=64 * 1024,
                          heartbeat_interval=30, heartbeat_timeout=60)
    with serving(example, config) as server:

        async def main() -> None:
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up fast
            stalled.connect(("127.0.0.1", server.port))
            stalled.sendall(UPGRADE + bytes([0x81, 0x80 | 8, 0, 0, 0, 0]) + b"sub:bulk")
            ws = await client(server.url)
            await recv(ws)
            await ws.send("sub:bulk")
            while on_loop(server, server.stats).topics.get("bulk") != 2:
                await asyncio.sleep(0.01)
            chunk = "x" * 32768
            for i in range(200):  # in step with the reader that keeps up: 6.5 MB in all
                server.call_soon(lambda i=i: server.publish("bulk", f"{i}:{chunk}"))
                assert json.loads(await recv(ws))["data"].startswith(f"{i}:")
            stats = on_loop(server, server.stats)
            assert stats.slow_consumer_closes == 1
            assert stats.topics == {"bulk": 1}
            stalled.close()

        run(main())


def test_a_failure_in_the_core_stops_the_server_and_serve_forever_raises_it(
    example: ModuleType,
) -> None:
    server = example.SelectorsServer(None, "127.0.0.1", 0)

    def broken(event: Any) -> Any:
        raise RuntimeError("a bug in shared state")

    server.core.receive = broken  # the next event poisons the server
    raised: list[BaseException] = []

    def target() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(UPGRADE)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""  # dropped: every socket is closed at once
    thread.join(5)
    assert not thread.is_alive()
    assert [str(exc) for exc in raised] == ["a bug in shared state"]
    assert server.failure is raised[0]


# ---------------------------------------------------------------------- a cluster node (Redis)


@pytest.fixture
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    # `make test` installs it (make e2e-deps): missing, this is a failure, never a skip.
    assert Path(binary).exists(), "redis-server is not installed (make e2e-deps)"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 5
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(5)


def broker_up(base: str) -> bool:
    return http(base, "GET", "/api/stats")[1]["broker_up"] is True


def test_two_nodes_share_a_redis(redis_url: str) -> None:
    async def main() -> None:
        one = await start(*QUIET, "--redis-url", redis_url)
        two = await start(*QUIET, "--redis-url", redis_url)
        for node in (one, two):
            await eventually(functools.partial(broker_up, node.base))
        ws = await client(one.url)
        await recv(ws)
        await ws.send("sub:news")
        for attempt in range(50):  # until node one has subscribed to the topic's channel
            await asyncio.to_thread(
                http, two.base, "POST", "/api/publish", {"topic": "news", "data": str(attempt)})
            with contextlib.suppress(TimeoutError):
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
                break
        else:
            raise AssertionError("nothing arrived through Redis")
        assert message["topic"] == "news"
        for node in (one, two):
            code, err = await node.stop()
            assert code == 0, err

    run(main(), timeout=25)
