"""``tank sub`` says what it is doing, and gives up at once on a final HTTP answer (issue 10).

On stderr, one short line each: connecting, connected, subscribed, and again after every lost
connection. A 4xx answer to the upgrade (but 408 and 429) will not change by retrying: it exits 1
at once, naming the status, after one attempt; a 5xx, 408 or 429 is retried as before.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from cli_support import eventually, kill, run, stop, tank

from tank_asyncio import Server, serve
from tank_cli import _clients
from tank_core import ServerConfig

FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)


async def _err_line(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> str:
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), timeout)).decode()
    assert line, "stderr closed"
    return line.rstrip("\n")


async def _err_until(proc: asyncio.subprocess.Process, prefix: str, timeout: float = 10.0) -> list[str]:
    """The stderr lines up to and including the first that starts with ``prefix``."""
    lines: list[str] = []
    while True:
        lines.append(await _err_line(proc, timeout))
        if lines[-1].startswith(prefix):
            return lines


def test_sub_says_connecting_connected_and_subscribed_also_after_a_reconnect() -> None:
    async def main() -> None:
        cm = serve(FAST, "127.0.0.1", 0)
        server: Server = await cm.__aenter__()
        port, url = server.port, server.url
        proc = await tank("sub", "news", "sport", "news", "--url", url)
        try:
            assert await _err_line(proc) == f"tank sub: connecting to {url}"
            assert await _err_line(proc) == f"tank sub: connected to {url}"
            assert await _err_line(proc) == "tank sub: subscribed to news, sport"
            await eventually(lambda: server.stats().topics == {"news": 1, "sport": 1}, timeout=10)

            await cm.__aexit__(None, None, None)  # Close 1001 to everyone
            assert await _err_line(proc) == (
                f"tank sub: disconnected (1001 server shutdown); reconnecting to {url}"
            )
            cm = serve(FAST, "127.0.0.1", port)
            server = await cm.__aenter__()
            lines = await _err_until(proc, "tank sub: reconnected")
            # While nothing listened: at most one line per distinct reason, never one per retry.
            assert all(line.startswith("tank sub: cannot connect (") for line in lines[:-1]), lines
            assert len(lines[:-1]) == len(set(lines[:-1])), lines
            assert lines[-1] == f"tank sub: reconnected to {url}"
            assert await _err_line(proc) == "tank sub: subscribed to news, sport"
            await eventually(lambda: server.stats().topics == {"news": 1, "sport": 1}, timeout=10)
            server.publish("sport", "goal")
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 5) == b"goal\n"
            code, out, err = await stop(proc, signal.SIGINT)
            assert (code, out, err) == (0, "", "")
        finally:
            await kill(proc)
            await cm.__aexit__(None, None, None)

    run(main(), timeout=40)


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, "Unauthorized"), (403, "Forbidden"), (400, "Bad Request"), (410, "Gone"), (404, "Not Found")],
)
def test_sub_gives_up_at_once_on_a_final_http_answer(status: int, words: str) -> None:
    calls: list[object] = []

    def authenticate(request: object) -> int:
        calls.append(request)
        return status

    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0, authenticate=authenticate) as server:
            # 404: the real server's answer to a path that is not the WebSocket path.
            url = server.url.replace("/ws", "/nope") if status == 404 else server.url
            started = time.monotonic()
            proc = await tank("sub", "news", "--url", url)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 5)
            finally:
                await kill(proc)
            elapsed = time.monotonic() - started
            assert proc.returncode == 1 and out == b""
            lines = err.decode().splitlines()
            assert lines == [
                f"tank sub: connecting to {url}",
                f"tank sub: error: {url} refused the upgrade: HTTP {status} {words}; not retrying",
            ]
            assert elapsed < 5  # not the 10 s of retries it took before
            assert len(calls) == (0 if status == 404 else 1)  # one attempt, no retry
            assert server.stats().connections == 0

    run(main(), timeout=30)


def test_sub_keeps_trying_through_answers_that_may_change() -> None:
    answers = [503, 429, 503, True]
    calls: list[object] = []

    def authenticate(request: object) -> object:
        calls.append(request)
        return answers[min(len(calls), len(answers)) - 1]

    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0, authenticate=authenticate) as server:
            proc = await tank("sub", "news", "--url", server.url)
            try:
                lines = await _err_until(proc, "tank sub: connected", timeout=10)
                assert lines == [
                    f"tank sub: connecting to {server.url}",
                    "tank sub: cannot connect (upgrade refused with HTTP 503 Service Unavailable); "
                    "retrying",
                    "tank sub: cannot connect (upgrade refused with HTTP 429 Too Many Requests); "
                    "retrying",
                    "tank sub: cannot connect (upgrade refused with HTTP 503 Service Unavailable); "
                    "retrying",
                    f"tank sub: connected to {server.url}",
                ]
                assert await _err_line(proc) == "tank sub: subscribed to news"
                assert len(calls) == 4
                code, _out, _err = await stop(proc, signal.SIGTERM)
                assert code == 0
            finally:
                await kill(proc)

    run(main(), timeout=30)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("upgrade refused with HTTP 401", "HTTP 401 Unauthorized"),
        ("upgrade refused with HTTP 404", "HTTP 404 Not Found"),
        ("upgrade refused with HTTP 451", "HTTP 451 Unavailable For Legal Reasons"),
        ("upgrade refused with HTTP 499", "HTTP 499"),
        ("upgrade refused with HTTP 403 Go Away", "HTTP 403 Go Away"),  # a phrase, if ever given
        ("upgrade refused with HTTP 408", None),
        ("upgrade refused with HTTP 429", None),
        ("upgrade refused with HTTP 500", None),
        ("upgrade refused with HTTP 503", None),
        ("upgrade refused with HTTP 301", None),
        ("[Errno 111] Connect call failed ('127.0.0.1', 1)", None),
        ("connect timeout", None),
        ("Server is shutting down", None),
    ],
)
def test_which_answers_are_final(reason: str, expected: str | None) -> None:
    assert _clients.final_refusal(reason) == expected
