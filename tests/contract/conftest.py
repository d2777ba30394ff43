"""Every test of the contract suite runs once per transport: asyncio, trio, the selectors example.

``serve(config=QUICK, **hooks)`` starts a server of the test's transport in a background thread
(contract_support.Served); whatever is still running at the end of the test is stopped gracefully,
and a failure of the server fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from contract_support import QUICK, TRANSPORTS, Serve, Served

from tank_core import ServerConfig


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(transport: str) -> Iterator[Serve]:
    started: list[Served] = []

    def start(config: ServerConfig | None = QUICK, **hooks: Any) -> Served:
        served = Served.start(transport, config, hooks)
        started.append(served)
        return served

    yield start
    failures: list[BaseException] = []
    for served in started:
        try:
            served.stop()
        except BaseException as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
