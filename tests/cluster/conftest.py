"""Fixtures of the cluster suite: a real redis-server on a free loopback port, and `tank serve` nodes.

The session's Redis is started once (installed with apt-get by install_redis.sh when missing) and
stopped at the end; a test that kills Redis gets a private one. Every node a test started must exit
0 on SIGTERM at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_support import Node, RedisServer, free_port, start_nodes

# Figures the tests report; printed at the end of the run (also with -q).
FIGURES: list[str] = []

StartCluster = Callable[..., list[Node]]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, not started yet (the test may kill and restart it)."""
    server = RedisServer(free_port(), tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[StartCluster]:
    """``start_cluster(["asyncio", "trio"], redis_url, *extra_args)`` -> serving nodes."""
    started: list[Node] = []

    def start(backends: list[str], redis_url: str | None, *extra: str) -> list[Node]:
        nodes = start_nodes(backends, redis_url, tmp_path, *extra)
        started.extend(nodes)
        return nodes

    yield start
    failures = []
    for node in started:
        rc = node.stop()
        if rc != 0:
            failures.append(f"`tank serve` ({node.backend}) exited {rc} on SIGTERM\n{node.log_tail()}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def report_figure() -> Callable[[str], None]:
    def report(line: str) -> None:
        FIGURES.append(line)
        print(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("tank cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
