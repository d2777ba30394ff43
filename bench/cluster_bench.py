#!/usr/bin/env python3
"""Cross-node deliveries/s against single-node deliveries/s, measured in the same run (issue 5).

Four processes serve, all ``python -m tank_cli serve`` with the same backend (``--backend``):

- **single**: one node without a broker (the in-memory default);
- **cluster**: nodes A and B sharing a real ``redis-server`` started here on a free loopback port.

The same number of subscribers (``--subscribers``, ``sub:bench``) connect to *single* and to *B*;
nobody subscribes on A. Each round publishes ``--messages`` messages of 100 bytes through the HTTP
API, pipelined on 8 keep-alive connections: to *single* (local fan-out), then to *A*, whose
subscribers are all on B (every delivery crosses Redis). A round ends when every subscriber has
every message; deliveries/s = messages x subscribers / (last delivery - first publish). Rounds
alternate between the two, so both see the same machine. Server CPU (utime+stime from
``/proc/PID/stat``) over each round gives CPU microseconds per delivery: *single* alone against
A + B + redis-server.

The subscribers count bytes (every frame on the topic has the same size) in this process, on
uvloop when available; the text heartbeat is off and the heartbeat interval long, so nothing else
arrives. Results go to stdout and to ``bench/results/cluster_bench.json``.

Usage: ``python bench/cluster_bench.py [--subscribers 250] [--messages 2000] [--rounds 5]
[--backend asyncio|trio] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
DATA = "x" * 100
PAYLOAD = ('{"topic":"bench","data":"' + DATA + '"}').encode()
FRAME = 4 + len(PAYLOAD)  # 127 bytes: a 4-byte header
CONNECTIONS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        subprocess.run(["bash", str(ROOT / "tests" / "cluster" / "install_redis.sh")], check=True)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.01)
    raise SystemExit("redis-server did not start")


def start_node(backend: str, redis_url: str | None, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, "-m", "tank_cli", "serve", "--host", HOST, "--port", "0",
           "--backend", backend, "--no-text-heartbeat", "--heartbeat-interval", "300",
           "--heartbeat-timeout", "900", "--log-level", "warning"]
    if redis_url is not None:
        cmd += ["--redis-url", redis_url]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "wb"))  # noqa: SIM115
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("tank: serving ws://"):
        raise SystemExit(f"node did not start: {line!r}\n{log.read_text()}")
    return proc, int(line.split("ws://")[1].split("/")[0].rsplit(":", 1)[1])


class Counter(asyncio.Protocol):
    """One subscriber: handshake, Hello, ``sub:bench``; then it counts bytes."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.ready = False
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(  # type: ignore[union-attr]
            f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if self.ready:
            self.received += len(data)
            if self.received >= self.group.target and not self.done:
                self.done = True
                self.group.finished(self)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 or len(self.head) < end + 4 + 2:
            return
        hello = self.head[end + 4 :]
        size = 2 + hello[1]
        if len(hello) < size:
            return
        sub = b"sub:bench"
        self.transport.write(bytes((0x81, 0x80 | len(sub))) + b"\0\0\0\0" + sub)  # type: ignore[union-attr]
        self.ready = True
        self.done = False
        self.received = len(hello) - size
        self.group.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready and not self.group.closing:
            print(f"subscriber lost: {exc}", file=sys.stderr)


class Group:
    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.subs: list[Counter] = []
        self.target = 0
        self.left = 0
        self.last = 0.0
        self.all_done: asyncio.Event = asyncio.Event()
        self.all_open: asyncio.Event = asyncio.Event()
        self._open = 0
        self.closing = False

    def opened(self) -> None:
        self._open += 1
        if self._open == self.count:
            self.all_open.set()

    def finished(self, _sub: Counter) -> None:
        self.left -= 1
        if self.left == 0:
            self.last = time.perf_counter()
            self.all_done.set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.count):
            _, sub = await loop.create_connection(lambda: Counter(self), HOST, self.port)
            self.subs.append(sub)
        await asyncio.wait_for(self.all_open.wait(), 30)

    def arm(self, messages: int) -> None:
        for sub in self.subs:
            sub.received = 0
            sub.done = False
        self.target = messages * FRAME
        self.left = len(self.subs)
        self.all_done = asyncio.Event()


async def publish(port: int, messages: int) -> None:
    body = json.dumps({"topic": "bench", "data": DATA}).encode()
    request = (
        f"POST /api/publish HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request * count)
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    shares = [messages // CONNECTIONS + (i < messages % CONNECTIONS) for i in range(CONNECTIONS)]
    await asyncio.gather(*(one(n) for n in shares if n))


async def wait_for_interest(redis_port: int, channel: bytes, want: int) -> None:
    command = b"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n$%d\r\n%s\r\n" % (len(channel), channel)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection(HOST, redis_port)
        writer.write(command)
        reply = await reader.read(200)
        writer.close()
        if reply.endswith(b":%d\r\n" % want):
            return
        await asyncio.sleep(0.02)
    raise SystemExit("the cluster never subscribed")


async def run(opts: argparse.Namespace, ports: dict[str, int], pids: dict[str, int]) -> dict[str, Any]:
    single = Group(ports["single"], opts.subscribers)
    remote = Group(ports["b"], opts.subscribers)
    await single.connect()
    await remote.connect()
    await wait_for_interest(ports["redis"], b"tank:t:bench", 1)
    results: dict[str, list[dict[str, float]]] = {"single": [], "cross": []}
    deliveries = opts.messages * opts.subscribers
    for round_ in range(-1, opts.rounds):  # round -1 warms up both
        for name, group, target, cpu_of in (
            ("single", single, ports["single"], ("single",)),
            ("cross", remote, ports["a"], ("a", "b", "redis")),
        ):
            group.arm(opts.messages)
            cpu_before = {p: cpu_seconds(pids[p]) for p in cpu_of}
            start = time.perf_counter()
            await publish(target, opts.messages)
            await asyncio.wait_for(group.all_done.wait(), 120)
            elapsed = group.last - start
            cpu = sum(cpu_seconds(pids[p]) - cpu_before[p] for p in cpu_of)
            if round_ >= 0:
                results[name].append({
                    "seconds": elapsed,
                    "deliveries_per_s": deliveries / elapsed,
                    "cpu_us_per_delivery": cpu / deliveries * 1e6,
                })
                print(f"round {round_ + 1} {name:6}: {deliveries / elapsed:12,.0f} deliveries/s, "
                      f"{cpu / deliveries * 1e6:.2f} us CPU/delivery", file=sys.stderr)
            await asyncio.sleep(0.2)
    single.closing = remote.closing = True
    for sub in single.subs + remote.subs:
        if sub.transport is not None:
            sub.transport.abort()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=250)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cluster_bench.json")
    opts = parser.parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        try:
            redis, redis_port = start_redis(tmpdir)
            procs.append(redis)
            url = f"redis://{HOST}:{redis_port}/0"
            single, single_port = start_node(opts.backend, None, tmpdir / "single.log")
            a, a_port = start_node(opts.backend, url, tmpdir / "a.log")
            b, b_port = start_node(opts.backend, url, tmpdir / "b.log")
            procs += [single, a, b]
            ports = {"single": single_port, "a": a_port, "b": b_port, "redis": redis_port}
            pids = {"single": single.pid, "a": a.pid, "b": b.pid, "redis": redis.pid}
            try:
                import uvloop

                runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            except ImportError:
                runner = asyncio.Runner()
            with runner:
                results = runner.run(run(opts, ports, pids))
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    single_rate = statistics.median(r["deliveries_per_s"] for r in results["single"])
    cross_rate = statistics.median(r["deliveries_per_s"] for r in results["cross"])
    single_cpu = statistics.median(r["cpu_us_per_delivery"] for r in results["single"])
    cross_cpu = statistics.median(r["cpu_us_per_delivery"] for r in results["cross"])
    print(f"backend {opts.backend}, {opts.subscribers} subscribers, {opts.messages} messages x "
          f"{opts.rounds} rounds, {os.cpu_count()} CPUs (medians)")
    print(f"  single node : {single_rate:12,.0f} deliveries/s  {single_cpu:6.2f} us server CPU/delivery")
    print(f"  cross-node  : {cross_rate:12,.0f} deliveries/s  {cross_cpu:6.2f} us server CPU/delivery "
          "(A + B + redis-server)")
    print(f"  cross / single: {cross_rate / single_rate:.2f}x throughput, "
          f"{cross_cpu / single_cpu:.2f}x CPU per delivery")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({
        "backend": opts.backend, "subscribers": opts.subscribers, "messages": opts.messages,
        "rounds": results, "single_deliveries_per_s": single_rate,
        "cross_deliveries_per_s": cross_rate, "ratio": cross_rate / single_rate,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
