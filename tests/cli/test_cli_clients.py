"""``tank sub`` and ``tank pub`` (issue 4) against a real server on 127.0.0.1.

``sub`` prints each message of its topics as it arrives (plain data, or JSON Lines with ``--json``),
survives a server restart, and exits 0 on SIGINT/SIGTERM; ``pub`` prints ``delivered N``, and an
HTTP error or an unreachable server is one line on stderr and exit status 1; bad usage is exit 2.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_support import eventually, run

import tank_asyncio
import tank_cli
from tank_asyncio import Server, serve
from tank_cli import _clients
from tank_core import ServerConfig

FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("TANK_") and not k.lower().endswith("_proxy")}


async def _tank(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tank_cli", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=_env(),
    )


async def _tank_output(*argv: str) -> tuple[int, str, str]:
    proc = await _tank(*argv)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()


async def _stop(proc: asyncio.subprocess.Process, signum: int) -> tuple[int, str, str]:
    proc.send_signal(signum)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit_code(argv: list[str]) -> int:
    try:
        return tank_cli.main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


# ---------------------------------------------------------------------- tank sub


def test_sub_prints_each_message_and_survives_a_restart_then_exits_0_on_sigint() -> None:
    async def main() -> None:
        cm = serve(FAST, "127.0.0.1", 0)
        server: Server = await cm.__aenter__()
        port = server.port
        proc = await _tank("sub", "news", "--url", server.url)
        try:
            await eventually(lambda: server.stats().topics.get("news") == 1, timeout=10)
            server.publish("other", "not for us")
            server.publish("news", "hello world")
            server.publish("news", "héllo <&>")
            assert await _line(proc) == "hello world\n"
            assert await _line(proc) == "héllo <&>\n"

            await cm.__aexit__(None, None, None)
            cm = serve(FAST, "127.0.0.1", port)
            server = await cm.__aenter__()
            await eventually(lambda: server.stats().topics.get("news") == 1, timeout=10)
            server.publish("news", "again")
            assert await _line(proc) == "again\n"
            await asyncio.sleep(0.2)
            code, out, err = await _stop(proc, signal.SIGINT)
            assert code == 0
            assert out == ""  # nothing twice
            assert "disconnected (1001" in err and "reconnected" in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await cm.__aexit__(None, None, None)

    run(main(), timeout=40)


def test_sub_json_prints_json_lines_and_exits_0_on_sigterm() -> None:
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            proc = await _tank("sub", "a", "b:c", "--json", "--url", server.url)
            try:
                await eventually(lambda: server.stats().topics == {"a": 1, "b:c": 1}, timeout=10)
                server.publish("a", "one")
                server.publish("b:c", '{"not": "parsed"}')
                first = json.loads(await _line(proc))
                second = json.loads(await _line(proc))
                assert {k: first[k] for k in ("topic", "data")} == {"topic": "a", "data": "one"}
                assert {k: second[k] for k in ("topic", "data")} == {
                    "topic": "b:c", "data": '{"not": "parsed"}'
                }
                for record in (first, second):
                    assert set(record) == {"topic", "data", "time"}
                    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
                                        record["time"])
                    when = datetime.datetime.fromisoformat(record["time"])
                    now = datetime.datetime.now(datetime.UTC)
                    assert abs((now - when).total_seconds()) < 10
                code, out, _err = await _stop(proc, signal.SIGTERM)
                assert code == 0 and out == ""
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    run(main(), timeout=30)


def test_sub_prints_non_string_data_as_json() -> None:
    # The server API only publishes strings; a relayed topic envelope can carry any JSON value.
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            proc = await _tank("sub", "news", "--url", server.url)
            try:
                await eventually(lambda: server.stats().topics.get("news") == 1, timeout=10)
                async with tank_asyncio.connect(server.url) as sender:
                    await sender.send('{"topic":"news","data":{"n":1,"s":"é"}}')
                    assert await _line(proc) == '{"n": 1, "s": "é"}\n'
                code, _out, _err = await _stop(proc, signal.SIGINT)
                assert code == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    run(main(), timeout=30)


def test_sub_gives_up_with_exit_1_when_the_first_connection_never_comes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_clients, "SUB_CONNECT_TIMEOUT", 0.5)
    port = _closed_port()
    url = f"ws://127.0.0.1:{port}/ws"
    assert tank_cli.main(["sub", "news", "--url", url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    # Issue 10: what it is doing, the reason once (not once per retry), then the one error line.
    assert len(lines) == 3, captured.err
    assert lines[0] == f"tank sub: connecting to {url}"
    assert lines[1].startswith("tank sub: cannot connect (") and lines[1].endswith("); retrying")
    assert lines[2].startswith("tank sub: error: no connection to ")
    assert "Connect call failed" in lines[2] or "refused" in lines[2].lower()


# ---------------------------------------------------------------------- tank pub


def test_pub_prints_how_many_it_reached() -> None:
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            got: list[object] = []
            api = f"http://127.0.0.1:{server.port}"
            async with tank_asyncio.connect(server.url) as one, tank_asyncio.connect(server.url) as two:
                for client in (one, two):
                    await client.subscribe("news", lambda data, m: got.append(data))
                await eventually(lambda: server.stats().topics.get("news") == 2)
                code, out, err = await _tank_output("pub", "news", "hi there", "--api", api + "/")
                assert (code, out, err) == (0, "delivered 2\n", "")
                await eventually(lambda: got == ["hi there", "hi there"])
                code, out, err = await _tank_output("pub", "nobody", "x", "--api", api)
                assert (code, out, err) == (0, "delivered 0\n", "")

    run(main(), timeout=30)


def test_pub_with_a_wrong_or_missing_api_key_is_401_and_exit_1() -> None:
    async def main() -> None:
        config = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, api_key="sekrit")
        async with serve(config, "127.0.0.1", 0) as server:
            api = f"http://127.0.0.1:{server.port}"
            for extra in (["--api-key", "wrong"], []):
                code, out, err = await _tank_output("pub", "news", "x", "--api", api, *extra)
                assert code == 1 and out == ""
                lines = err.splitlines()
                assert len(lines) == 1, err
                assert lines[0].startswith("tank pub: error: HTTP 401 from ")
            code, out, err = await _tank_output("pub", "news", "x", "--api", api,
                                                "--api-key", "sekrit")
            assert (code, out, err) == (0, "delivered 0\n", "")

    run(main(), timeout=30)


def test_pub_to_nothing_listening_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    assert tank_cli.main(["pub", "news", "x", "--api", f"http://127.0.0.1:{port}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tank pub: error: cannot reach ") and "refused" in lines[0].lower()


# ---------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sub"], "TOPIC"),
        (["sub", "news", "--url", "http://127.0.0.1:8080/ws"], "--url"),
        (["sub", "news", "--bogus"], "--bogus"),
        (["sub", "news", "--user-id", ""], "--user-id"),
        (["pub"], "TOPIC"),
        (["pub", "news"], "DATA"),
        (["pub", "news", "x", "--api", "ws://127.0.0.1:8080"], "--api"),
        (["pub", "news", "x", "--api-key", ""], "--api-key"),
        (["pub", "news", "x", "extra"], "extra"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert re.match(r"tank( sub| pub)?: error: ", lines[0])
    assert needle in lines[0]


def test_help_lists_the_client_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--help"]) == 0
    out: Any = capsys.readouterr().out
    assert "sub" in out and "pub" in out and "serve" in out
