"""``tank serve`` (issue 3): options, TANK_<OPTION> variables, the start line, signals, exit codes;
``tank --version``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import trustme
from cli_support import client, eventually, run
from websockets.exceptions import ConnectionClosed

import tank_cli
from tank_cli import _config, _main
from tank_cli._args import UsageError
from tank_core import History, HistoryPolicy, Limits

URL_LINE = re.compile(r"^tank: serving (ws://127\.0\.0\.1:(\d+)(/\S*)) \(backend (\w+)\)$")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TANK_"):
            monkeypatch.delenv(name)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANK_")}
    env.update(extra)
    return env


def _exit_code(argv: list[str]) -> int:
    try:
        return tank_cli.main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


# ---------------------------------------------------------------------- bad values: one line, 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--heartbeat-timeout", "1", "--heartbeat-interval", "5"], "heartbeat_timeout"),
        (["--port", "x"], "--port"),
        (["--port", "70000"], "--port"),
        (["--backend", "foo"], "--backend"),
        (["--heartbeat-interval", "-1"], "--heartbeat-interval"),
        (["--close-timeout", "nan"], "--close-timeout"),
        (["--max-message-size", "0"], "--max-message-size"),
        (["--max-outbox-bytes", "lots"], "--max-outbox-bytes"),
        (["--max-outbox-bytes", "1000"], "max_outbox_bytes"),  # smaller than one message
        (["--max-frames-per-second", "0"], "--max-frames-per-second"),
        (["--max-connections", "many"], "--max-connections"),
        (["--input-budget", "off"], "--input-budget"),
        (["--trusted-proxy", ""], "--trusted-proxy"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--path", "nope"], "path"),
        (["--path", "/api/x"], "path"),
        (["--api-key", ""], "--api-key"),
        (["--redis-url", "http://x"], "Redis URL"),
        (["--redis-url", "redis://h:99999"], "Redis URL"),
        (["--bogus"], "--bogus"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["serve", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert re.match(r"tank( serve)?: error: ", lines[0])
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TANK_PORT", "x"),
        ("TANK_HEARTBEAT_TIMEOUT", "1"),
        ("TANK_NO_RELAY", "maybe"),
        ("TANK_BACKEND", "foo"),
        ("TANK_MAX_MESSAGE_SIZE", "-5"),
    ],
)
def test_a_bad_environment_value_is_one_line_and_exit_2(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    assert _exit_code(["serve"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tank serve: error: ")
    if name != "TANK_HEARTBEAT_TIMEOUT":
        assert name in lines[0]
    else:
        assert "heartbeat_timeout" in lines[0]


def test_no_command_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


# ---------------------------------------------------------------------- defaults and environment


def _settings(argv: list[str]) -> _config.Settings:
    args = _main.build_parser().parse_args(["serve", *argv])
    return _config.resolve(args, os.environ)


def test_defaults_are_the_documented_ones() -> None:
    settings = _settings([])
    config = settings.config
    assert (settings.host, settings.port, settings.backend, settings.log_level) == (
        "127.0.0.1", 8080, "asyncio", "info"
    )
    assert settings.log_format == "text"
    assert config.path == "/ws"
    assert (config.heartbeat_interval, config.heartbeat_timeout, config.close_timeout) == (5, 15, 2)
    assert config.text_heartbeat and config.relay
    assert config.max_message_size == 1_048_576 and config.max_outbox_bytes == 4_194_304
    assert config.allowed_origins == frozenset() and config.api_key is None
    assert config.broker is None  # the in-memory default: one process
    assert config.limits == Limits()  # every limit at tank_core's default
    assert config.trusted_proxies == frozenset() and config.allowed_hosts == frozenset()


def test_every_option_is_read_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = trustme.CA()
    both = tmp_path / "cert-and-key.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(both))
    env = {
        "TANK_HOST": "0.0.0.0",
        "TANK_PORT": "9001",
        "TANK_PATH": "/socket",
        "TANK_BACKEND": "trio",
        "TANK_HEARTBEAT_INTERVAL": "0.5",
        "TANK_HEARTBEAT_TIMEOUT": "2",
        "TANK_CLOSE_TIMEOUT": "1.5",
        "TANK_NO_TEXT_HEARTBEAT": "1",
        "TANK_NO_RELAY": "true",
        "TANK_MAX_MESSAGE_SIZE": "1000",
        "TANK_MAX_OUTBOX_BYTES": "2000",
        "TANK_ALLOWED_ORIGIN": "https://a.example, https://b.example",
        "TANK_API_KEY": "k3y",
        "TANK_LOG_LEVEL": "warning",
        "TANK_LOG_FORMAT": "json",
        "TANK_REDIS_URL": "redis://127.0.0.1:6390/2",
        "TANK_TRUSTED_PROXY": "127.0.0.1, ::1",
        "TANK_ALLOWED_HOST": "tank.internal",
        "TANK_INPUT_BUDGET": "4096",
        "TANK_MAX_FRAMES_PER_SECOND": "off",
        "TANK_MAX_INPUT_BYTES_PER_SECOND": "2e6",
        "TANK_MAX_CONNECTIONS": "500",
        "TANK_MAX_CONNECTIONS_PER_ADDRESS": "OFF",
        "TANK_MAX_TOPICS_PER_CONNECTION": "50",
        "TANK_MAX_TOPIC_LENGTH": "64",
        "TANK_MAX_PARTIAL_BYTES": "1000000",
        "TANK_MAX_STATS_ENTRIES": "10",
        "TANK_NO_COMPRESSION": "1",
        "TANK_COMPRESSION_THRESHOLD": "0",
        "TANK_HISTORY_SIZE": "off",  # a cluster keeps no history yet (ConfigError otherwise)
        "TANK_HISTORY_TTL": "60",
        "TANK_CERTFILE": str(both),
        "TANK_KEYFILE": str(both),
    }
    assert {f"TANK_{o.dest.upper()}" for o in _config.OPTIONS} == set(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = _settings([])
    config = settings.config
    assert (settings.host, settings.port, settings.backend, settings.log_level) == (
        "0.0.0.0", 9001, "trio", "warning"
    )
    assert settings.log_format == "json"
    assert config.path == "/socket"
    assert (config.heartbeat_interval, config.heartbeat_timeout, config.close_timeout) == (
        0.5, 2, 1.5
    )
    assert not config.text_heartbeat and not config.relay
    assert not config.compression and config.compression_threshold == 0
    assert config.history is None
    assert (config.max_message_size, config.max_outbox_bytes) == (1000, 2000)
    assert config.allowed_origins == {"https://a.example", "https://b.example"}
    assert config.api_key == "k3y"
    assert config.broker is not None
    assert (config.broker.host, config.broker.port, config.broker.db) == ("127.0.0.1", 6390, 2)
    assert settings.ssl is not None  # the certificate and key from the environment
    assert config.trusted_proxies == {"127.0.0.1", "::1"}
    assert config.allowed_hosts == {"tank.internal"}
    assert config.limits == Limits(
        input_budget=4096, max_frames_per_second=None, max_input_bytes_per_second=2e6,
        max_connections=500, max_connections_per_address=None, max_topics_per_connection=50,
        max_topic_length=64, max_partial_bytes=1_000_000, max_stats_entries=10,
    )


def test_history_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANK_HISTORY_TTL", "60")
    assert _settings([]).config.history is None  # off by default
    config = _settings(["--history-size", "50"]).config
    assert config.history == History(keep=HistoryPolicy(size=50, ttl=60.0))
    with pytest.raises(UsageError, match="cluster"):
        _settings(["--history-size", "5", "--redis-url", "redis://127.0.0.1:6390/0"])


def test_the_command_line_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANK_PORT", "9001")
    monkeypatch.setenv("TANK_HEARTBEAT_INTERVAL", "0.5")
    monkeypatch.setenv("TANK_HEARTBEAT_TIMEOUT", "2")
    monkeypatch.setenv("TANK_ALLOWED_ORIGIN", "https://env.example")
    monkeypatch.setenv("TANK_NO_RELAY", "0")
    settings = _settings([
        "--port", "0", "--heartbeat-interval", "1", "--allowed-origin", "https://a.example",
        "--allowed-origin", "https://b.example", "--no-relay",
    ])
    assert settings.port == 0
    assert settings.config.heartbeat_interval == 1
    assert settings.config.heartbeat_timeout == 2  # from the environment
    assert settings.config.allowed_origins == {"https://a.example", "https://b.example"}
    assert not settings.config.relay


# ---------------------------------------------------------------------- the real process


class Served:
    def __init__(self, process: asyncio.subprocess.Process, line: str) -> None:
        self.process = process
        self.line = line
        match = URL_LINE.match(line)
        assert match is not None, line
        self.url = match.group(1)
        self.port = int(match.group(2))
        self.backend = match.group(4)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str, str]:
        self.process.send_signal(signum)
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


async def start(*argv: str, env: dict[str, str] | None = None) -> Served:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tank_cli", "serve", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else _clean_env(),
    )
    assert process.stdout is not None
    try:
        raw = await asyncio.wait_for(process.stdout.readline(), 10)
    except TimeoutError:
        process.kill()
        raise
    if not raw:
        _out, err = await process.communicate()
        raise AssertionError(f"tank serve exited {process.returncode}: {err.decode()}")
    return Served(process, raw.decode().rstrip("\n"))


def test_port_0_prints_the_real_url_and_sigterm_exits_0() -> None:
    async def main() -> None:
        served = await start("--port", "0", "--heartbeat-interval", "0.2",
                             "--heartbeat-timeout", "0.6")
        assert served.backend == "asyncio"
        assert served.port != 0 and served.url.endswith("/ws")
        ws = await client(served.url + "?user_id=cli")
        assert await asyncio.wait_for(ws.recv(), 5) == "Hello, cli! Welcome to WebSocket server."
        code, out, _err = await served.stop(signal.SIGTERM)
        assert code == 0
        assert out == ""  # the one start line was read already; nothing else on stdout
        texts: list[Any] = []
        with pytest.raises(ConnectionClosed):
            while True:
                texts.append(await asyncio.wait_for(ws.recv(), 5))
        assert "Server is shutting down" in texts
        assert ws.close_code == 1001

    run(main())


def test_sigint_shuts_down_gracefully_and_exits_0() -> None:
    async def main() -> None:
        served = await start("--port", "0")
        ws = await client(served.url)
        await asyncio.wait_for(ws.recv(), 5)
        code, _out, _err = await served.stop(signal.SIGINT)
        assert code == 0
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1001

    run(main())


def test_environment_variables_reach_the_process() -> None:
    async def main() -> None:
        served = await start(env=_clean_env(TANK_PORT="0", TANK_PATH="/from-env",
                                            TANK_NO_TEXT_HEARTBEAT="1"))
        assert served.url.endswith("/from-env")
        ws = await client(served.url)
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
        code, _out, _err = await served.stop()
        assert code == 0

    run(main())


def test_debug_logs_one_line_per_frame_in_and_out() -> None:
    async def main() -> None:
        served = await start("--port", "0", "--log-level", "debug")
        ws = await client(served.url + "?user_id=dbg")
        await asyncio.wait_for(ws.recv(), 5)
        await ws.send("sub:news")
        await ws.close()
        code, _out, err = await served.stop()
        assert code == 0
        assert "-> text 'Hello, dbg! Welcome to WebSocket server.'" in err
        assert "<- text 'sub:news'" in err
        assert "<- close 1000" in err and "-> close 1000" in err

    run(main())


def test_info_logs_no_frames() -> None:
    async def main() -> None:
        served = await start("--port", "0")
        ws = await client(served.url)
        await asyncio.wait_for(ws.recv(), 5)
        await ws.send("sub:news")
        await ws.close()
        code, _out, err = await served.stop()
        assert code == 0
        assert "tank.frames" not in err

    run(main())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_address_in_use_is_one_line_and_a_failure(backend: str) -> None:
    async def main() -> None:
        served = await start("--port", "0")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tank_cli", "serve", "--port", str(served.port),
            "--backend", backend,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_clean_env(),
        )
        out, err = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 1
        assert out == b""
        assert len(err.decode().splitlines()) == 1
        code, _out, _err = await served.stop()
        assert code == 0

    run(main())


def test_trio_backend() -> None:
    async def main() -> None:
        served = await start("--backend", "trio", "--port", "0")
        assert served.backend == "trio"
        ws = await client(served.url)
        hello = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(hello, str) and hello.startswith("Hello, ")
        code, _, _ = await served.stop(signal.SIGTERM)
        assert code == 0
        await eventually(lambda: ws.close_code is not None)
        assert ws.close_code == 1001

    run(main())


# ---------------------------------------------------------------------- tank --version


def test_version_prints_the_installed_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"tank {metadata.version('tank-python')}\n"
    assert captured.err == ""


def test_version_from_the_module_and_the_console_script() -> None:
    expected = f"tank {metadata.version('tank-python')}\n"
    commands = [[sys.executable, "-m", "tank_cli", "--version"]]
    script = Path(sys.executable).with_name("tank")
    if script.is_file():  # installed by `pip install -e .`: it must reach tank_cli
        commands.append([str(script), "--version"])

    async def main() -> None:
        for command in commands:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=_clean_env(),
            )
            out, err = await asyncio.wait_for(process.communicate(), 10)
            assert (process.returncode, out.decode(), err.decode()) == (0, expected, ""), command

    run(main())
