"""Every ```python block of the README and of every page under docs/ runs as written, each in a
fresh interpreter from the repository's root; and every unlabelled block of docs/custom-transports.md
is an excerpt of examples/selectors_server.py, word for word.

A block that needs more than an interpreter says so in an HTML comment on the line just before it
(invisible on GitHub and on the site):

- ``<!-- docs-test: serves -->``: a server program that runs until Ctrl+C. It listens on the port
  in ``$PORT`` and prints its ``ws://`` URL. The test starts it with ``PORT=0``, connects a
  WebSocket client that subscribes to ``news``, publishes to ``news`` through the HTTP API (with
  ``Content-Type: application/json``, as any caller without an API key must), checks that the
  client gets the message, then sends SIGINT: the program must exit with status 0.
- ``<!-- docs-test: excerpt -->``: the block is not run; it stands word for word in a program under
  ``examples/``, which has tests of its own (a how-to walking through an example).
- ``<!-- docs-test: redis -->``: the block needs a Redis. The test starts ``redis-server`` on a free
  port (it fails, never skips, when there is none) and gives its URL in ``$REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", *sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").rglob("*.md")))
EXAMPLE = ROOT / "examples" / "selectors_server.py"
FENCE = re.compile(r"^(?:<!-- docs-test: (?P<mark>[a-z]+) -->\n)?```(?P<info>[^\n`]*)\n(?P<body>.*?)^```$",
                   re.MULTILINE | re.DOTALL)
MARKS = ("serves", "redis", "excerpt")

sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from cluster_support import RedisServer, free_port  # noqa: E402


def fenced(page: str, info: str) -> list[tuple[str, str]]:
    """(mark, body) of each fenced block of ``page`` whose info string is ``info``."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(found["mark"] or "", found["body"]) for found in FENCE.finditer(text)
            if found["info"].strip() == info]


def blocks(page: str, info: str) -> list[str]:
    """The bodies of the fenced blocks of ``page`` whose info string is ``info``."""
    return [body for _mark, body in fenced(page, info)]


PYTHON = [(page, index) for page in PAGES for index in range(len(blocks(page, "python")))]


def numbered(code: str) -> str:
    return "\n".join(f"{n:3} {line}" for n, line in enumerate(code.splitlines(), 1))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("docs-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_every_docs_page_is_checked_and_marks_are_known() -> None:
    assert "docs/tutorial.md" in PAGES and "docs/explanation/protocol.md" in PAGES
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for mark in re.findall(r"<!-- docs-test: ([^ ]*) -->", text):
            assert mark in MARKS, f"{page}: unknown mark {mark!r}"
        assert len(re.findall(r"<!-- docs-test: ", text)) == sum(
            1 for info in ("python",) for mark, _ in fenced(page, info) if mark
        ), f"{page}: a docs-test mark must sit on the line just before a ```python block"


def test_the_pages_with_examples_have_python_blocks() -> None:
    for page in ("README.md", "docs/custom-transports.md", "docs/testing.md", "docs/tutorial.md",
                 "docs/how-to/embed-asyncio.md", "docs/how-to/embed-trio.md"):
        assert blocks(page, "python"), page


@pytest.mark.parametrize(("page", "index"), PYTHON,
                         ids=[f"{p.removeprefix('docs/')}[{i}]" for p, i in PYTHON])
def test_python_block_runs(page: str, index: int, request: pytest.FixtureRequest) -> None:
    mark, code = fenced(page, "python")[index]
    if mark == "excerpt":
        programs = [path.read_text(encoding="utf-8") for path in (ROOT / "examples").glob("*.py")]
        assert any(code in program for program in programs), f"{page} block {index}: not in examples/"
        return
    env = dict(os.environ)
    if mark == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    if mark == "serves":
        check_server_program(page, index, code, env)
        return
    done = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, f"{page} block {index}:\n{numbered(code)}\n\n{done.stderr}"


def check_server_program(page: str, index: int, code: str, env: dict[str, str]) -> None:
    """Start the program on a free port, subscribe, publish through the API, receive, SIGINT."""
    program = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, "PORT": "0"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    where = f"{page} block {index}:\n{numbered(code)}"
    try:
        assert program.stdout is not None
        line = program.stdout.readline()
        found = re.search(r"ws://([^/\s]+)(/\S*)", line)
        assert found, f"{where}\n\nno ws:// URL in its first line: {line!r}"
        # The API lives beside the WebSocket path: at the root, or under a mount point.
        url, api = found[0], f"http://{found[1]}{found[2].rsplit('/', 1)[0]}"
        with ws_connect(url + "?user_id=docs-test", open_timeout=10) as ws:
            assert str(ws.recv(timeout=10)).startswith("Hello, docs-test!")
            ws.send("sub:news")
            deadline = time.monotonic() + 10
            while publish(api, "news", "from the docs test") < 1:  # until the sub: was read
                assert time.monotonic() < deadline, f"{where}\n\nthe subscription never took"
                time.sleep(0.02)
            expected = json.dumps({"topic": "news", "data": "from the docs test"}, separators=(",", ":"))
            while (message := ws.recv(timeout=10)) != expected:
                assert time.monotonic() < deadline + 10, f"{where}\n\nlast message: {message!r}"
        program.send_signal(signal.SIGINT)
        _out, err = program.communicate(timeout=20)
        assert program.returncode == 0, f"{where}\n\nexit status {program.returncode} after SIGINT:\n{err}"
    finally:
        if program.poll() is None:
            program.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                program.communicate(timeout=5)


def publish(api: str, topic: str, data: str) -> int:
    """POST /api/publish as a caller without an API key must: JSON, from loopback."""
    request = urllib.request.Request(
        api + "/api/publish", method="POST", data=json.dumps({"topic": topic, "data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to loopback
    with opener.open(request, timeout=10) as answer:
        return int(json.load(answer)["delivered"])


@pytest.mark.parametrize("index", range(len(blocks("docs/custom-transports.md", ""))))
def test_excerpt_is_in_the_example(index: int) -> None:
    excerpt = blocks("docs/custom-transports.md", "")[index]
    assert excerpt in EXAMPLE.read_text(encoding="utf-8"), excerpt
