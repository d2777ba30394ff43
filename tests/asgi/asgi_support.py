"""Tools of the ASGI suite: the application processes (``asgi_app.py`` and ``examples/fastapi_app.py``
under uvicorn, hypercorn and hypercorn on trio), and the tank-websocket.js 2.0.3 replay under Node.

An ``AsgiProcess`` is an ``e2e_support.TankProcess`` started differently: the HTTP helpers
(``publish``, ``stats``, ``await_stats``...) and the WebSocket URL carry the mount point ``/tank``,
so every helper of the end-to-end suite works on it unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_support import HOST, ROOT, HttpAnswer, TankProcess, http_request

HERE = Path(__file__).resolve().parent
APP = HERE / "asgi_app.py"
EXAMPLE = ROOT / "examples" / "fastapi_app.py"
SERVERS = ["uvicorn", "hypercorn", "hypercorn-trio"]
MOUNT = "/tank"

# The suite's short settings (seconds): interval, silence timeout, close timeout. The close
# timeout is long enough for a stalled reader to resume and still read its Close 1008.
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 0.6
CLOSE_TIMEOUT = 3.0
# Small limits, so that 1009 and 1008 take little data.
MAX_MESSAGE_SIZE = 65_536
MAX_OUTBOX_BYTES = 262_144
#: hypercorn's ``Config.graceful_timeout`` (the example's ``serve()`` keeps the default).
HYPERCORN_GRACEFUL_TIMEOUT = 3.0

SERVING_LINE = re.compile(
    r"^tank: serving ws://(?P<host>[^/\s]+):(?P<port>\d+)(?P<path>/\S*) \((?P<server>[\w-]+)\)$"
)


@dataclass
class AsgiProcess(TankProcess):
    """One application process: ``script --server SERVER ARGS``; ``backend`` is the server's name."""

    script: Path = APP
    prefix: str = MOUNT  # where Tank is mounted: its API answers below it
    ready: bool = False
    _launched: bool = field(default=False, repr=False)

    def launch(self) -> AsgiProcess:
        cmd = [sys.executable, str(self.script), "--server", self.backend, "--port", str(self.port),
               *self.args]
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
        self._launched = True
        return self

    def start(self, timeout: float = 30.0) -> AsgiProcess:
        if not self._launched:
            self.launch()
        return self.await_ready(timeout)

    def await_ready(self, timeout: float = 30.0) -> AsgiProcess:
        """Its serving line, then ``/tank/readyz`` answering 200 (the lifespan has run)."""
        if self.ready:
            return self
        deadline = time.monotonic() + timeout
        line = self._read_line(timeout)
        match = SERVING_LINE.match(line)
        if match is None:
            self.kill()
            raise AssertionError(f"{self.script.name} printed {line!r}\n{self.log_tail()}")
        assert match["server"] == self.backend, line
        self.serving_line = line
        self.host, self.port, self.path = match["host"], int(match["port"]), match["path"]
        assert self.path == f"{self.prefix}/ws", line
        while True:
            with contextlib.suppress(OSError):
                if self.http("GET", "/readyz", timeout=1.0).status == 200:
                    break
            if not self.running or time.monotonic() > deadline:
                raise AssertionError(f"{self.script.name} never became ready\n{self.log_tail()}")
            time.sleep(0.05)
        self.ready = True
        return self

    def http(  # type: ignore[override]
        self,
        method: str,
        target: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> HttpAnswer:
        """A request to Tank's HTTP layer: ``target`` is below the mount point."""
        return self.app_http(method, self.prefix + target, body, headers, timeout)

    def app_http(
        self,
        method: str,
        target: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> HttpAnswer:
        """A request to the application, any path (its own routes as well as Tank's)."""
        return http_request(self.port, method, target, body, headers, timeout)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 15.0) -> int:
        return super().stop(signum, timeout)


def new_process(
    server: str, log_dir: Path, name: str, *args: str, script: Path = APP
) -> AsgiProcess:
    return AsgiProcess(backend=server, args=list(args), log_path=log_dir / f"{name}-{server}.log",
                       script=script)


def main_args(*extra: str) -> list[str]:
    """The suite's settings for ``asgi_app.py``."""
    return [
        "--heartbeat-interval", str(HEARTBEAT_INTERVAL), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
        "--close-timeout", str(CLOSE_TIMEOUT), "--max-message-size", str(MAX_MESSAGE_SIZE),
        "--max-outbox-bytes", str(MAX_OUTBOX_BYTES), *extra,
    ]


# --------------------------------------------------------------------------------- Node


# --------------------------------------------------------------------------------- misc


def port_is_closed(port: int) -> bool:
    """True when nothing accepts TCP connections on ``port`` any more."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((HOST, port))
        except OSError:
            return True
        # Accepted by the kernel: still listening (or the backlog of a closing listener).
        sock.setblocking(False)
        ready, _, _ = select.select([sock], [], [], 0.3)
        if ready:
            try:
                return sock.recv(1) == b""
            except OSError:
                return True
        return False
