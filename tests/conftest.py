from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# The client contract suite's support modules (client_backends, client_support) also serve the
# adapters' own client tests (tests/trio): importable by name from every test directory.
_CLIENT_CONTRACT = str(Path(__file__).resolve().parent / "client_contract")
if _CLIENT_CONTRACT not in sys.path:
    sys.path.insert(0, _CLIENT_CONTRACT)

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
