#!/usr/bin/env python3
"""``wss://`` against ``ws://`` (issue 12's must-show): the handshake rate and the idle memory per
connection, both backends, in one run.

For each backend and scheme a fresh ``python -m tank_cli serve --backend B --port 0`` (for wss:
``--certfile``/``--keyfile`` from a certificate authority made here with trustme; the heartbeat
pushed out and the per-address limit off, as in the other benches) is measured twice:

- **handshake rate**: ``--conns`` clients in this process (asyncio, uvloop when installed), each
  opening a connection, completing the TLS handshake (wss), the WebSocket upgrade and reading the
  Hello frame, then closing it, again and again for ``--seconds``; reported: upgrades per second
  and the server's CPU seconds per 1,000 upgrades (``/proc/PID/stat``);
- **idle memory**: ``--idle`` connections opened and left idle; reported: the server's RSS growth
  (``/proc/PID/status``) per connection, once all of them have their Hello.

The clients run on this process's own CPU time; the ratios are wss / ws of the same backend in the
same run. Only 127.0.0.1 is contacted; every server is killed at the end of its case.

Usage: ``.venv/bin/python bench/tls_bench.py [--quick] [--backends asyncio,trio]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
URL_LINE = re.compile(rb"tank: serving (wss?)://127\.0\.0\.1:(\d+)/")
REQUEST = (
    "GET /ws?user_id=b HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(backend: str, pem: tuple[Path, Path] | None) -> tuple[subprocess.Popen[bytes], int]:
    args = [PYTHON, "-m", "tank_cli", "serve", "--port", "0", "--backend", backend,
            "--heartbeat-interval", "1000", "--heartbeat-timeout", "3000",
            "--max-connections-per-address", "off", "--log-level", "warning"]
    if pem is not None:
        args += ["--certfile", str(pem[0]), "--keyfile", str(pem[1])]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = URL_LINE.search(line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"unexpected start line {line!r}")
    return proc, int(match.group(2))


async def open_ws(port: int, context: ssl.SSLContext | None) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="127.0.0.1" if context else None)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(REQUEST.format(key=key).encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head[:60])
    hello = b""
    while b"Welcome" not in hello:
        hello += await reader.read(4096)
    return reader, writer


async def handshake_rate(port: int, context: ssl.SSLContext | None, conns: int,
                         seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            _reader, writer = await open_ws(port, context)
            done += 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return done


async def idle(port: int, context: ssl.SSLContext | None, count: int, pid: int) -> float:
    before = rss_kib(pid)
    opened = []
    for start_at in range(0, count, 100):
        opened += await asyncio.gather(*(open_ws(port, context)
                                         for _ in range(min(100, count - start_at))))
    await asyncio.sleep(1.0)
    grown = rss_kib(pid) - before
    for _reader, writer in opened:
        writer.close()
    return grown / count


def measure(backend: str, scheme: str, pem: tuple[Path, Path], client: ssl.SSLContext,
            opts: argparse.Namespace) -> dict[str, float]:
    tls = scheme == "wss"
    proc, port = start(backend, pem if tls else None)
    try:
        context = client if tls else None
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        upgrades = asyncio.run(handshake_rate(port, context, opts.conns, opts.seconds))
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
        per_conn = asyncio.run(idle(port, context, opts.idle, proc.pid))
    finally:
        proc.kill()
        proc.wait()
    return {"upgrades_per_s": upgrades / wall, "server_cpu_s_per_1000": 1000 * cpu / upgrades,
            "idle_kib_per_conn": per_conn}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tls_bench.json"))
    opts = parser.parse_args()
    opts.seconds, opts.conns, opts.idle = (1.0, 8, 300) if opts.quick else (4.0, 16, 2000)
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    results: dict[str, dict[str, dict[str, float]]] = {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cert = ca.issue_cert("127.0.0.1")
        pem = (Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
        cert.cert_chain_pems[0].write_to_path(str(pem[0]))
        cert.private_key_pem.write_to_path(str(pem[1]))
        for backend in opts.backends.split(","):
            for scheme in ("ws", "wss"):
                figures = measure(backend, scheme, pem, client, opts)
                results.setdefault(backend, {})[scheme] = figures
                print(f"{backend:8} {scheme:4} {figures['upgrades_per_s']:8.0f} upgrades/s  "
                      f"{figures['server_cpu_s_per_1000']:6.3f} server CPU s per 1,000  "
                      f"{figures['idle_kib_per_conn']:6.1f} KiB per idle connection", flush=True)
    print(f"\nload average {load0} -> {os.getloadavg()}")
    print("| backend | upgrades/s ws | wss | wss/ws | server CPU s per 1,000 ws | wss | KiB/idle ws | wss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for backend, by in results.items():
        ws, wss = by["ws"], by["wss"]
        print(f"| {backend} | {ws['upgrades_per_s']:,.0f} | {wss['upgrades_per_s']:,.0f} | "
              f"{wss['upgrades_per_s'] / ws['upgrades_per_s']:.2f} | "
              f"{ws['server_cpu_s_per_1000']:.3f} | {wss['server_cpu_s_per_1000']:.3f} | "
              f"{ws['idle_kib_per_conn']:.1f} | {wss['idle_kib_per_conn']:.1f} |")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"results": results, "load": [load0, os.getloadavg()]},
                                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
