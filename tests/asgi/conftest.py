"""Fixtures of the ASGI suite: every test runs once per ASGI server (``uvicorn``, ``hypercorn`` on
asyncio, ``hypercorn-trio``) against real application processes on 127.0.0.1.

The processes a session needs are all started at once when the first test asks for one (``fleet``),
and the tests begin once every one of them is ready: on two cores, booting them in parallel costs a
fraction of booting them one by one, and no timing-sensitive test runs beside a booting process.

- ``main_app``: ``asgi_app.py`` with the suite's settings (heartbeat 0.2 s / 0.6 s, close timeout
  3 s, max_message_size 64 KiB, max_outbox_bytes 256 KiB), shared by the tests of a server;
- ``silent_app``: the same with ``close_silent=True``;
- ``example_app``: ``examples/fastapi_app.py`` as it is (``--port 0``);
- ``shutdown_app`` and ``example_stop_app``: one process per test, which the test stops.

The shared processes are stopped with SIGINT at the end of the session and must exit 0.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The support modules of this suite and of the end-to-end and cluster suites, importable by name.
# Appended, not prepended: ``from conftest import ...`` in tests/cluster must still find its own.
for _directory in (HERE, HERE.parent / "e2e", HERE.parent / "cluster"):
    if str(_directory) not in sys.path:
        sys.path.append(str(_directory))

from asgi_support import EXAMPLE, SERVERS, AsgiProcess, main_args, new_process  # noqa: E402

#: fixture name -> (script, arguments, shared by the tests of a server)
KINDS: dict[str, tuple[Path, list[str], bool]] = {
    "main_app": (HERE / "asgi_app.py", main_args(), True),
    "silent_app": (HERE / "asgi_app.py", main_args("--close-silent"), True),
    "example_app": (EXAMPLE, [], True),
    "shutdown_app": (HERE / "asgi_app.py", main_args(), False),
    "example_stop_app": (EXAMPLE, [], False),
}

_WANTED = pytest.StashKey[list[tuple[str, str, int]]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note which processes the selected tests need: (fixture, server, how many)."""
    wanted: dict[tuple[str, str], int] = {}
    for item in items:
        if not isinstance(item, pytest.Function) or HERE not in Path(str(item.fspath)).parents:
            continue
        callspec = getattr(item, "callspec", None)
        server = callspec.params.get("asgi_server") if callspec is not None else None
        for name in item.fixturenames:
            if name in KINDS and server is not None:
                shared = KINDS[name][2]
                key = (name, server)
                wanted[key] = 1 if shared else wanted.get(key, 0) + 1
    config.stash[_WANTED] = [(name, server, n) for (name, server), n in wanted.items()]


class Fleet:
    """Every application process of the session, started together."""

    def __init__(self, log_dir: Path, wanted: list[tuple[str, str, int]]) -> None:
        self.log_dir = log_dir
        self.shared: dict[tuple[str, str], AsgiProcess] = {}
        self.spares: dict[tuple[str, str], list[AsgiProcess]] = {}
        self.all: list[AsgiProcess] = []
        for name, server, count in wanted:
            script, args, shared = KINDS[name]
            for i in range(count):
                proc = new_process(server, log_dir, f"{name}{i}", *args, script=script).launch()
                self.all.append(proc)
                if shared:
                    self.shared[name, server] = proc
                else:
                    self.spares.setdefault((name, server), []).append(proc)
        for proc in self.all:
            proc.await_ready()

    def get(self, name: str, server: str) -> AsgiProcess:
        proc = self.shared.get((name, server))
        if proc is None:  # not foreseen at collection (e.g. asked for by getfixturevalue)
            script, args, _ = KINDS[name]
            proc = self.shared[name, server] = new_process(
                server, self.log_dir, name, *args, script=script).start()
            self.all.append(proc)
        assert proc.running, f"the {name} process ({server}) is gone\n{proc.log_tail()}"
        return proc

    def take(self, name: str, server: str) -> AsgiProcess:
        spares = self.spares.get((name, server))
        if spares:
            return spares.pop()
        script, args, _ = KINDS[name]
        proc = new_process(server, self.log_dir, f"{name}-late", *args, script=script).start()
        self.all.append(proc)
        return proc

    def stop(self) -> list[str]:
        failures = []
        for proc in self.all:
            if proc.running:
                proc.send_signal(signal.SIGINT)  # all at once, then reap
        for proc in self.all:
            if proc.proc is not None and proc.returncode is None:
                rc = proc.wait(15)
                if rc != 0 and proc in self.shared.values():
                    failures.append(f"{proc.script.name} ({proc.backend}) exited {rc} on SIGINT\n"
                                    f"{proc.log_tail()}")
        return failures


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("asgi"), request.config.stash.get(_WANTED, []))
    yield fleet
    failures = fleet.stop()
    assert not failures, "\n".join(failures)


@pytest.fixture(params=SERVERS)
def asgi_server(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def main_app(fleet: Fleet, asgi_server: str) -> AsgiProcess:
    return fleet.get("main_app", asgi_server)


@pytest.fixture
def silent_app(fleet: Fleet, asgi_server: str) -> AsgiProcess:
    return fleet.get("silent_app", asgi_server)


@pytest.fixture
def example_app(fleet: Fleet, asgi_server: str) -> AsgiProcess:
    return fleet.get("example_app", asgi_server)


@pytest.fixture
def shutdown_app(fleet: Fleet, asgi_server: str) -> Iterator[AsgiProcess]:
    proc = fleet.take("shutdown_app", asgi_server)
    yield proc
    if proc.running:
        proc.kill()


@pytest.fixture
def example_stop_app(fleet: Fleet, asgi_server: str) -> Iterator[AsgiProcess]:
    proc = fleet.take("example_stop_app", asgi_server)
    yield proc
    if proc.running:
        proc.kill()
