"""Helpers for the command-line tests: run a coroutine with a bound, open a `websockets` client, run
real `tank` processes (``tank``, ``start_serve``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one test coroutine on a fresh event loop, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def client(url: str, **kwargs: Any) -> ClientConnection:
    """A `websockets` client; it answers Pings on its own, as browsers do."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("ping_interval", None)
    return await connect(url, proxy=None, compression=None, **kwargs)


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``check()`` is true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


# ---------------------------------------------------------------------- real `tank` processes

ROOT = Path(__file__).resolve().parents[2]
#: The stdout line `tank serve` prints when it listens (scripts and the other suites parse it).
URL_LINE = re.compile(r"^tank: serving (wss?://127\.0\.0\.1:(\d+)(/\S*)) \(backend (\w+)\)$")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without TANK_* settings or proxies, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TANK_") and not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


async def tank(*argv: str, env: dict[str, str] | None = None,
               stdin: int | None = None) -> asyncio.subprocess.Process:
    """``python -m tank_cli ARGV...`` with its stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tank_cli", *argv, stdin=stdin, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env if env is not None else clean_env(),
    )


async def finish(process: asyncio.subprocess.Process, timeout: float = 20.0,
                 stdin: bytes | None = None) -> tuple[int, str, str]:
    """Wait for ``process`` to exit: its status, stdout and stderr."""
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def stop(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM,
               timeout: float = 10.0) -> tuple[int, str, str]:
    """Send ``signum`` and wait for the exit: status, the rest of stdout, stderr."""
    process.send_signal(signum)
    return await finish(process, timeout)


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs (a test's cleanup)."""
    if process.returncode is None:
        process.kill()
        await process.wait()


class Served:
    """A `tank serve` process that printed its serving line."""

    def __init__(self, process: asyncio.subprocess.Process, line: str) -> None:
        self.process = process
        self.line = line
        match = URL_LINE.match(line)
        assert match is not None, line
        self.url = match.group(1)
        self.port = int(match.group(2))
        self.backend = match.group(4)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> Any:
        """GET ``path`` of its HTTP API (no proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.api + path, timeout=5) as response:
            return json.loads(response.read())

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str, str]:
        return await stop(self.process, signum, timeout)


async def start_serve(*argv: str, env: dict[str, str] | None = None) -> Served:
    """``tank serve --port 0 ARGV...`` on 127.0.0.1, once it printed its serving line."""
    process = await tank("serve", "--port", "0", *argv, env=env)
    assert process.stdout is not None
    try:
        raw = await asyncio.wait_for(process.stdout.readline(), 10)
    except TimeoutError:
        process.kill()
        raise
    if not raw:
        _out, err = await process.communicate()
        raise AssertionError(f"tank serve exited {process.returncode}: {err.decode()}")
    return Served(process, raw.decode().rstrip("\n"))


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
