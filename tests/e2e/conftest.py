"""Fixtures of the end-to-end suite: every test runs once per backend and once per scheme
(``ws``: plain TCP; ``wss``: TLS with a certificate authority made by the test) against a real
`tank serve`. A test that cannot run over TLS says so with ``@ws_only("why")`` (e2e_support):
it is then parametrized on ``ws`` alone, and listed in README.md."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import e2e_support
import pytest
from e2e_support import (
    CLOSE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    StartServer,
    TankProcess,
    Tls,
)

BACKENDS = ["asyncio", "trio"]
SCHEMES = ["ws", "wss"]

# Figures the measurement tests report; printed at the end of the run (also with -q).
FIGURES: list[str] = []


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    """``ws`` or ``wss``; ``@ws_only(reason)`` on a test narrows it to ``ws``."""
    return str(request.param)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """The session's certificate authority and server certificate (made on first use)."""
    material = Tls.make(tmp_path_factory.mktemp("tls"))
    e2e_support.TLS = material  # what the clients trust (e2e_support.client_ssl)
    return material


@pytest.fixture
def tls_or_none(scheme: str, request: pytest.FixtureRequest) -> Tls | None:
    """The test CA's material over ``wss``, None over ``ws``."""
    if scheme == "ws":
        return None
    assert scheme == "wss", scheme
    material: Tls = request.getfixturevalue("tls")
    return material


@pytest.fixture
def start_server(backend: str, tls_or_none: Tls | None, tmp_path: Path) -> Iterator[StartServer]:
    """A factory: ``start_server("--no-relay", port=p, heartbeat=(0.5, 1.5))`` -> a started server,
    serving ``wss://`` with the test CA's certificate when the scheme is ``wss``.

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
            backend=backend, args=args, port=port, env=env, tls=tls_or_none,
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this suite that starts a server (or runs the command line) runs over both
    schemes. (The hook sees the whole session's items: other suites are not its business.)"""
    here = Path(__file__).resolve().parent
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("ws_only"):
            continue
        if here not in Path(str(item.fspath)).resolve().parents:
            continue
        names = item.fixturenames
        if "backend" in names and "scheme" not in names:
            raise pytest.UsageError(f"{item.nodeid} runs once per backend but not per scheme")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ws_only(reason): runs over ws:// only (set by e2e_support.ws_only)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("tank e2e figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
