"""Headless Chromium (Debian's `chromium`) with a plain browser WebSocket, on both backends.

A tiny http.server in the test serves the page and receives its results: the page subscribes,
receives a publish, and stays connected across several heartbeat intervals, answering the server's
Pings as browsers do (they cannot see them; they see the text `heartbeat`). Then it POSTs what it
saw back to the test. Over wss:// the page itself comes over HTTPS (an https page may only open
wss://), and Chromium accepts the test's certificate by its public key (the SPKI list flag).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from e2e_support import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    HOST,
    TankProcess,
    Tls,
    chromium_tls_flags,
    serve_https,
)

CHROMIUM = "/usr/bin/chromium"
#: Long and repetitive enough to be compressed (compression_threshold is 128 bytes).
NEWS = "from the test <&> ✓ " * 12

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tank e2e</title></head>
<body><pre id="log">starting</pre>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const wanted = Number(params.get("heartbeats"));
const events = [];
let published = false, heartbeatsAfter = 0, sent = false;
function report(state) {
  if (sent) return;
  sent = true;
  fetch("/results", {method: "POST", body: JSON.stringify({state, readyState: ws.readyState, events})});
  document.getElementById("log").textContent = state;
}
const ws = new WebSocket(params.get("ws"));
ws.onopen = () => { events.push({ev: "open", t: performance.now()}); ws.send("sub:" + params.get("topic")); };
ws.onmessage = (e) => {
  const isText = typeof e.data === "string";
  events.push({ev: "message", t: performance.now(), text: isText, data: isText ? e.data : null});
  if (isText && e.data.indexOf('"topic"') > 0) published = true;
  if (published && e.data === "heartbeat" && ++heartbeatsAfter >= wanted) report("done");
};
ws.onclose = (e) => { events.push({ev: "close", t: performance.now(), code: e.code}); report("closed"); };
ws.onerror = () => { events.push({ev: "error", t: performance.now()}); };
setTimeout(() => report("timeout"), 15000);
</script></body></html>
"""


class _Pages(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: Tls | None) -> None:
        super().__init__((HOST, 0), _Handler)
        self.scheme = serve_https(self, tls)
        self.results: dict[str, Any] | None = None
        self.got = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    server: _Pages

    def do_GET(self) -> None:
        body = PAGE.encode()
        self.send_response(200 if self.path.startswith("/page") else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.results = json.loads(self.rfile.read(length))
        self.server.got.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _launch(url: str, profile: Path, tls: Tls | None) -> subprocess.Popen[bytes]:
    assert Path(CHROMIUM).exists(), "chromium is not installed (run tests/e2e/install_deps.sh)"
    return subprocess.Popen(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--no-proxy-server",
            *chromium_tls_flags(tls), f"--user-data-dir={profile}", url,
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def test_browser_subscribes_receives_and_stays_connected(server: TankProcess, tmp_path: Path) -> None:
    pages = _Pages(server.tls)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    heartbeats = 8  # 8 intervals (1.6 s) after the publish: well past the 0.6 s timeout
    url = (
        f"{pages.scheme}://{HOST}:{pages.server_address[1]}/page?topic=news&heartbeats={heartbeats}"
        f"&ws={quote(server.url('browser'), safe='')}"
    )
    browser = _launch(url, tmp_path / "profile", server.tls)
    try:
        deadline = time.monotonic() + 20
        while True:  # the page opened and subscribed
            if server.stats()["topics"].get("news") == 1:
                break
            assert browser.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "the page never subscribed"
            time.sleep(0.05)
        published_at = time.monotonic()
        assert server.publish("news", NEWS) == 1
        assert pages.got.wait(20), "the page never reported"
        elapsed = time.monotonic() - published_at
        results = pages.results
        assert results is not None
        snapshot = server.stats()
    finally:
        browser.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            browser.wait(5)
        if browser.poll() is None:
            browser.kill()
            browser.wait(5)
        pages.shutdown()
        pages.server_close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)

    events = results["events"]
    assert results["state"] == "done", results
    assert results["readyState"] == 1  # OPEN
    assert [e["ev"] for e in events if e["ev"] != "message"] == ["open"], events
    messages = [e for e in events if e["ev"] == "message"]
    assert all(e["text"] for e in messages), "the server sent a binary frame"
    assert messages[0]["data"] == "Hello, browser! Welcome to WebSocket server."
    topical = [json.loads(e["data"]) for e in messages if e["data"].startswith("{")]
    assert topical == [{"topic": "news", "data": NEWS}]
    beats = [e["t"] for e in messages if e["data"] == "heartbeat"]
    assert len(beats) >= heartbeats
    assert elapsed >= (heartbeats - 1) * HEARTBEAT_INTERVAL
    # Connected for several timeouts, only by answering Pings: the server saw its Pongs.
    assert (beats[-1] - events[0]["t"]) / 1000 > 2 * HEARTBEAT_TIMEOUT
    assert snapshot["connections"] == 1
    assert snapshot["heartbeat_timeouts"] == 0
    assert snapshot["pongs_received"] >= heartbeats
    # Chromium offers permessage-deflate: the publish went out compressed (RFC 7692, our ext).
    assert snapshot["compressed_connections"] == 1
    assert snapshot["messages_compressed"] == 1
