"""tank_core must stay pure: no event loop, no sockets, no threads, no clock reads (DESIGN.md §1)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "tank_core"


def test_importing_the_core_pulls_in_no_io_module() -> None:
    code = (
        "import importlib, pkgutil, sys, tank_core\n"
        "for info in pkgutil.walk_packages(tank_core.__path__, 'tank_core.'):\n"
        "    importlib.import_module(info.name)\n"
        # threading is left out here: the session rules log (logging takes its locks from
        # threading, and starts no thread); the source scan below still forbids importing it.
        "bad = sorted(m for m in ('asyncio', 'trio', 'socket', 'selectors', 'ssl')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


FORBIDDEN = [
    (re.compile(r"\btime\.(time|monotonic|perf_counter|sleep|time_ns|monotonic_ns)\b"), "clock read"),
    (re.compile(r"\bdatetime\.(now|utcnow|today)\b"), "clock read"),
    (re.compile(r"\bdate\.today\b"), "clock read"),
    (re.compile(r"^\s*import (asyncio|trio|socket|selectors|threading)\b", re.M), "I/O import"),
    (re.compile(r"^\s*from (asyncio|trio|socket|selectors|threading)\b", re.M), "I/O import"),
    (re.compile(r"\brandom\.(random|randint|choice|getrandbits|uniform|shuffle|randrange)\("),
     "module-level random call (inject an RNG)"),
]


def test_core_sources_read_no_clock_and_import_no_io() -> None:
    problems = []
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text()
        for pattern, what in FORBIDDEN:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.name}:{line}: {what}: {match.group(0).strip()}")
    assert problems == []


def test_every_core_module_states_its_idea_in_a_header() -> None:
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text().lstrip()
        assert text.startswith('"""'), f"{path.name} has no header docstring"
