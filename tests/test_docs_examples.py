"""Every ```python block of the README and of the how-to guides runs as written, each in a fresh
interpreter from the repository's root; and every unlabelled block of docs/custom-transports.md is
an excerpt of examples/selectors_server.py, word for word."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ("README.md", "docs/custom-transports.md", "docs/testing.md")
EXAMPLE = ROOT / "examples" / "selectors_server.py"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(guide: str, info: str) -> list[str]:
    """The bodies of the fenced blocks of ``guide`` whose info string is ``info``."""
    text = (ROOT / guide).read_text(encoding="utf-8")
    return [body for found_info, body in FENCE.findall(text) if found_info.strip() == info]


PYTHON = [(guide, index) for guide in GUIDES for index in range(len(blocks(guide, "python")))]


def test_every_guide_has_python_blocks() -> None:
    for guide in GUIDES:
        assert blocks(guide, "python"), guide


@pytest.mark.parametrize(("guide", "index"), PYTHON, ids=[f"{g.split('/')[-1]}[{i}]" for g, i in PYTHON])
def test_python_block_runs(guide: str, index: int) -> None:
    code = blocks(guide, "python")[index]
    done = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    numbered = "\n".join(f"{n:3} {line}" for n, line in enumerate(code.splitlines(), 1))
    assert done.returncode == 0, f"{guide} block {index}:\n{numbered}\n\n{done.stderr}"


@pytest.mark.parametrize("index", range(len(blocks("docs/custom-transports.md", ""))))
def test_excerpt_is_in_the_example(index: int) -> None:
    excerpt = blocks("docs/custom-transports.md", "")[index]
    assert excerpt in EXAMPLE.read_text(encoding="utf-8"), excerpt
