"""Fixtures of the end-to-end suite: every test runs once per backend against a real `tank serve`."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import CLOSE_TIMEOUT, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, StartServer, TankProcess

BACKENDS = ["asyncio", "trio"]

# Figures the measurement tests report; printed at the end of the run (also with -q).
FIGURES: list[str] = []


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_server(backend: str, tmp_path: Path) -> Iterator[StartServer]:
    """A factory: ``start_server("--no-relay", port=p, heartbeat=(0.5, 1.5))`` -> a started server.

    Every server still running at teardown is stopped with SIGTERM and must exit 0.
    """
    started: list[TankProcess] = []

    def start(
        *extra: str,
        port: int = 0,
        heartbeat: tuple[float, float] | None = (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT),
        close_timeout: float | None = CLOSE_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> TankProcess:
        args: list[str] = []
        if heartbeat is not None:
            args += ["--heartbeat-interval", str(heartbeat[0]), "--heartbeat-timeout", str(heartbeat[1])]
        if close_timeout is not None:
            args += ["--close-timeout", str(close_timeout)]
        args += list(extra)
        proc = TankProcess(
            backend=backend, args=args, port=port, env=env,
            log_path=tmp_path / f"server-{len(started)}.log",
        )
        started.append(proc)
        return proc.start()

    yield start

    failures = []
    for proc in started:
        if proc.running:
            rc = proc.stop(signal.SIGTERM)
            if rc != 0:
                failures.append(f"`tank serve` exited {rc} on SIGTERM\n{proc.log_tail()}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def server(start_server: StartServer) -> TankProcess:
    """A server with the suite's short heartbeat settings (0.2 s / 0.6 s, close timeout 0.5 s)."""
    return start_server()


@pytest.fixture
def report_figure() -> Callable[[str], None]:
    """Record one line for the "tank e2e figures" section of the terminal summary."""

    def report(line: str) -> None:
        FIGURES.append(line)
        print(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("tank e2e figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
