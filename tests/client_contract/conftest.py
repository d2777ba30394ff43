"""Every test of the client contract suite runs once per client backend: asyncio and trio.

The ``backend`` fixture is a fresh ``client_backends.Backend``; ``backend.run(body)`` runs the
async test body on that backend's own loop, against an in-process server of the same backend.
"""

from __future__ import annotations

import pytest
from client_backends import BACKENDS, Backend


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]()
