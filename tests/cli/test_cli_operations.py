"""``tank serve`` for operators (issue 10): connections and disconnections in the log at info, a reset
at debug only, ``--log-format json``, a time-stamped start record that says where the status page,
the API and ``/metrics`` are, and SIGHUP as a graceful shutdown."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import signal
import socket
import struct
import urllib.request
from typing import Any

import pytest
from cli_support import (
    Served,
    clean_env,
    client,
    eventually,
    finish,
    kill,
    run,
    start_serve,
    tank,
)
from websockets.exceptions import ConnectionClosed

from tank_cli import _serve

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _reset_after_hello(port: int) -> None:
    """Open a WebSocket by hand, read the Hello, then reset the TCP connection (RST, no Close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws?user_id=rst HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        received = b""
        while b"Welcome" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.status, response.headers.get("content-type", "")


# ---------------------------------------------------------------------- connections at info


def test_info_hooks_are_per_connection_never_per_message() -> None:
    assert set(_serve._hooks("info")) == {"on_connect", "on_disconnect", "on_error"}
    assert set(_serve._hooks("debug")) == {"on_event"}
    assert _serve._hooks("warning") == {}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_info_logs_each_connection_and_disconnection_with_code_and_reason(backend: str) -> None:
    async def main() -> None:
        served = await start_serve("--backend", backend)
        ws = await client(served.url + "?user_id=ops")
        await asyncio.wait_for(ws.recv(), 5)
        await ws.send("sub:news")
        await ws.close(code=4000, reason="bye now")
        await eventually(lambda: served.get_json("/api/stats")["connections"] == 0)
        code, _out, err = await served.stop()
        assert code == 0
        assert re.search(rf"^{TIME} INFO tank\.events: conn (\d+) connected: user 'ops' from "
                         r"127\.0\.0\.1$", err, re.MULTILINE), err
        assert re.search(rf"^{TIME} INFO tank\.events: conn (\d+) disconnected: user 'ops', code "
                         r"4000 'bye now'$", err, re.MULTILINE), err
        assert "sub:news" not in err  # nothing per message

    run(main())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_info_logs_each_http_request_answered(backend: str) -> None:
    async def main() -> None:
        served = await start_serve("--backend", backend)
        assert served.get_json("/api/stats")["connections"] == 0
        assert _get(served.url.replace("ws://", "http://").rsplit("/", 1)[0] + "/healthz")[0] == 200
        code, _out, err = await served.stop()
        assert code == 0
        assert re.search(rf'^{TIME} INFO tank\.http: 127\.0\.0\.1 "GET /api/stats" 200$', err,
                         re.MULTILINE), err
        assert re.search(rf'^{TIME} INFO tank\.http: 127\.0\.0\.1 "GET /healthz" 200$', err,
                         re.MULTILINE), err

    run(main())


def test_a_reset_is_one_info_line_and_its_error_only_at_debug() -> None:
    async def main() -> None:
        for level in ("info", "debug"):
            served = await start_serve("--log-level", level)
            _reset_after_hello(served.port)
            await eventually(lambda s=served: s.get_json("/api/stats")["connections"] == 0)
            code, _out, err = await served.stop()
            assert code == 0
            disconnected = re.findall(rf"^{TIME} (\w+) tank\.events: conn \d+ disconnected: user "
                                      r"'rst', code 1006 '(.*)'$", err, re.MULTILINE)
            assert [found[0] for found in disconnected] == ["INFO"], err
            errors = re.findall(rf"^{TIME} (\w+) tank\.events: error 1003: ", err, re.MULTILINE)
            assert errors == ([] if level == "info" else ["DEBUG"]), err

    run(main(), timeout=40)


# ---------------------------------------------------------------------- the start record


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_start_is_logged_with_a_time_and_where_the_page_api_and_metrics_are(backend: str) -> None:
    async def main() -> None:
        served = await start_serve("--backend", backend)
        assert served.line == f"tank: serving {served.url} (backend {backend})"  # stdout: unchanged
        base = served.api
        assert served.process.stderr is not None
        first = (await asyncio.wait_for(served.process.stderr.readline(), 5)).decode().rstrip("\n")
        assert re.fullmatch(
            rf"{TIME} INFO tank: serving {re.escape(served.url)} \(backend {backend}\); status page "
            rf"{re.escape(base)}/, API {re.escape(base)}/api/ \(publish, broadcast, disconnect, "
            rf"stats\), metrics {re.escape(base)}/metrics", first), first
        stamp = datetime.datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f")
        assert abs((datetime.datetime.now() - stamp).total_seconds()) < 60
        # Each place it names answers there.
        assert _get(base + "/")[1].startswith("text/html")
        assert _get(base + "/api/stats")[1].startswith("application/json")
        assert _get(base + "/metrics")[0] == 200
        code, _out, _err = await served.stop()
        assert code == 0

    run(main())


def test_where_the_http_places_are() -> None:
    assert _serve.where("ws://127.0.0.1:8080/ws") == {
        "url": "ws://127.0.0.1:8080/ws",
        "status_page": "http://127.0.0.1:8080/",
        "api": "http://127.0.0.1:8080/api/",
        "metrics": "http://127.0.0.1:8080/metrics",
    }
    # --path /: the WebSocket wins at /, there is no status page.
    assert _serve.where("ws://[::1]:80/")["status_page"] is None
    assert _serve.where("ws://[::1]:80/")["api"] == "http://[::1]:80/api/"


# ---------------------------------------------------------------------- --log-format json


def _records(err: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in err.splitlines()]
    now = datetime.datetime.now(datetime.UTC)
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert RFC3339.fullmatch(record["time"]), record
        when = datetime.datetime.fromisoformat(record["time"])
        assert abs((now - when).total_seconds()) < 60
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
    return records


@pytest.mark.parametrize("how", ["flag", "env"])
def test_json_log_format_is_one_object_per_line_with_the_fields(how: str) -> None:
    async def main() -> None:
        if how == "flag":
            served: Served = await start_serve("--log-format", "json")
        else:
            served = await start_serve(env=clean_env(TANK_LOG_FORMAT="json"))
        ws = await client(served.url + "?user_id=j%22son")
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close(code=1000, reason="done")
        await eventually(lambda: served.get_json("/api/stats")["connections"] == 0)
        code, _out, err = await served.stop(signal.SIGTERM)
        assert code == 0
        records = _records(err)
        by_event = {record.get("event"): record for record in records}
        start = by_event["serving"]
        assert start["logger"] == "tank" and start["level"] == "info"
        assert start["url"] == served.url and start["backend"] == "asyncio"
        assert start["status_page"] == served.api + "/"
        assert start["api"] == served.api + "/api/"
        assert start["metrics"] == served.api + "/metrics"
        connected = by_event["connected"]
        assert connected["logger"] == "tank.events" and connected["level"] == "info"
        assert connected["user_id"] == 'j"son' and connected["peer"] == "127.0.0.1"
        assert isinstance(connected["conn_id"], int)
        disconnected = by_event["disconnected"]
        assert (disconnected["conn_id"], disconnected["code"], disconnected["reason"]) == (
            connected["conn_id"], 1000, "done")
        assert disconnected["message"] == (
            f"conn {connected['conn_id']} disconnected: user 'j\"son', code 1000 'done'")
        assert by_event["shutting_down"]["signal"] == "SIGTERM"
        assert records[-1]["message"] == "stopped"

    run(main())


def test_a_bad_log_format_in_the_environment_is_one_line_and_exit_2() -> None:
    # A process of its own: a command line that did not know TANK_LOG_FORMAT would serve.
    async def main() -> None:
        process = await tank("serve", "--port", "0", env=clean_env(TANK_LOG_FORMAT="yaml"))
        try:
            code, out, err = await finish(process, timeout=10)
        finally:
            await kill(process)
        assert (code, out) == (2, "")
        assert err == ("tank serve: error: environment variable TANK_LOG_FORMAT: invalid choice "
                       "'yaml' (choose from text, json)\n")

    run(main())


def test_json_log_format_at_debug_carries_the_frames_too() -> None:
    async def main() -> None:
        served = await start_serve("--log-format", "json", "--log-level", "debug")
        ws = await client(served.url)
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
        await eventually(lambda: served.get_json("/api/stats")["connections"] == 0)
        code, _out, err = await served.stop()
        assert code == 0
        loggers = {record["logger"] for record in _records(err)}
        assert {"tank", "tank.events", "tank.frames"} <= loggers

    run(main())


# ---------------------------------------------------------------------- SIGHUP


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sighup_shuts_down_gracefully_like_sigterm(backend: str) -> None:
    async def main() -> None:
        served = await start_serve("--backend", backend)
        ws = await client(served.url)
        await asyncio.wait_for(ws.recv(), 5)
        code, out, err = await served.stop(signal.SIGHUP)
        assert code == 0, err
        assert out == ""
        assert re.search(rf"^{TIME} INFO tank: shutting down \(SIGHUP\)$", err, re.MULTILINE), err
        texts: list[object] = []
        with pytest.raises(ConnectionClosed):
            while True:
                texts.append(await asyncio.wait_for(ws.recv(), 5))
        assert "Server is shutting down" in texts
        assert ws.close_code == 1001

    run(main())
