"""Shared pieces of the client contract suite: test settings, a server that restarts on the same
port, a closed port, HTTP calls to a ``tank serve`` subprocess, a self-signed certificate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from client_backends import Backend

from tank_core import ServerConfig
from tank_core.notifications import TopicSubscribed

FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)
#: Client settings for tests: quick retries, quick liveness checks.
QUICK: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.0,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 2.0,
}
ROOT = Path(__file__).resolve().parents[2]


class Restartable:
    """A server of the test's backend that can be stopped and started again on the same port."""

    def __init__(self, backend: Backend, config: ServerConfig = FAST, **hooks: Any) -> None:
        self.backend = backend
        self.config = config
        self.hooks = hooks
        self.port = 0
        self.server: Any = None

    async def start(self) -> Any:
        self.server = await self.backend.start_server(self.config, self.port, **self.hooks)
        self.port = self.server.port
        return self.server

    async def stop(self) -> None:
        assert self.server is not None
        await self.backend.stop_server(self.server)
        self.server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subscriptions(events: list[Any]) -> Counter[str]:
    return Counter(e.topic for e in events if isinstance(e, TopicSubscribed))


def http_publish(port: int, topic: str, data: str) -> int:
    body = json.dumps({"topic": topic, "data": data}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.loads(response.read())["delivered"])


def http_topics(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as response:
        topics: dict[str, int] = json.loads(response.read())["topics"]
        return topics


def self_signed(directory: str) -> tuple[str, str] | None:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
             cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key
