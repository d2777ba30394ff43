"""``tank pub`` prints what the answer says and reads ``-`` from standard input (issue 10).

A cluster node answers ``{"delivered": N, "broker": "up"|"partial"|"down"}``, N counted on that node:
``tank pub`` prints ``delivered N (broker: STATE)``, so that a 0 here is not mistaken for "nobody got
it". ``tank pub TOPIC -`` publishes standard input (UTF-8, one final newline dropped).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

from cli_support import Served, closed_port, eventually, finish, kill, run, start_serve, tank

import tank_asyncio
from tank_asyncio import serve
from tank_core import ServerConfig

FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)


async def _pub(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await tank("pub", *argv, stdin=None if stdin is None else asyncio.subprocess.PIPE)
    try:
        return await finish(proc, stdin=stdin)
    finally:
        await kill(proc)


# ---------------------------------------------------------------------- standard input


def test_pub_dash_publishes_standard_input() -> None:
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            api = f"http://127.0.0.1:{server.port}"
            got: list[object] = []
            async with tank_asyncio.connect(server.url) as client:
                await client.subscribe("news", lambda data, message: got.append(data))
                await eventually(lambda: server.stats().topics.get("news") == 1)
                cases = [
                    (b"hello\n", "hello"),  # `echo hello | tank pub news -`
                    ("héllo\nsecond line\n\n".encode(), "héllo\nsecond line\n"),  # one newline off
                    (b"crlf\r\n", "crlf"),
                    (b"no newline", "no newline"),
                    (b"-", "-"),  # how to publish a lone dash
                    (b"", ""),
                ]
                for raw, _text in cases:
                    assert await _pub("news", "-", "--api", api, stdin=raw) == (0, "delivered 1\n", "")
                await eventually(lambda: len(got) == len(cases))
                assert got == [text for _raw, text in cases]

    run(main(), timeout=60)


def test_pub_dash_with_input_that_is_not_utf8_is_one_line_and_exit_1() -> None:
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            api = f"http://127.0.0.1:{server.port}"
            code, out, err = await _pub("news", "-", "--api", api, stdin=b"\xff\xfe bad")
            assert code == 1 and out == ""
            lines = err.splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith("tank pub: error: cannot read the message from standard input")
            assert server.stats().messages_out == 0

    run(main(), timeout=30)


# ---------------------------------------------------------------------- a cluster node's answer


class _Redis:
    """A redis-server of the test's own on a free loopback port (no persistence)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        assert Path(binary).exists(), "redis-server is missing (`make e2e-deps` installs it)"
        self.port = closed_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def test_pub_prints_the_broker_state_a_cluster_node_answers(tmp_path: Path) -> None:
    redis = _Redis(tmp_path)

    async def main() -> None:
        up: Served = await start_serve("--redis-url", redis.url)
        down: Served = await start_serve("--redis-url", f"redis://127.0.0.1:{closed_port()}/0")
        try:
            await eventually(lambda: up.get_json("/api/stats").get("broker_up") is True, timeout=15)
            async with tank_asyncio.connect(up.url) as client:
                await client.subscribe("news")
                await eventually(lambda: up.get_json("/api/stats")["topics"].get("news") == 1)
                assert await _pub("news", "x", "--api", up.api) == (
                    0, "delivered 1 (broker: up)\n", "")
            assert await _pub("nobody", "x", "--api", up.api) == (
                0, "delivered 0 (broker: up)\n", "")
            # Redis unreachable: local delivery only, and the answer says so.
            assert down.get_json("/api/stats").get("broker_up") is False
            assert await _pub("news", "x", "--api", down.api) == (
                0, "delivered 0 (broker: down)\n", "")
        finally:
            for node in (up, down):
                if node.process.returncode is None:
                    code, _out, err = await node.stop(signal.SIGTERM)
                    assert code == 0, err

    try:
        run(main(), timeout=60)
    finally:
        redis.stop()
