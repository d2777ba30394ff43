#!/usr/bin/env python3
"""Benchmark of Tank's servers over real sockets, against ``websockets`` and picows, same run, same load.

Four servers, each its own process pinned to CPU 0; one load generator process pinned to CPU 1:

- ``tank-asyncio``, ``tank-trio``: our server (``tank_asyncio`` on uvloop, ``tank_trio``);
- ``websockets``: ``bench/peers/websockets_server.py``, the library's broadcast server (uvloop);
- ``picows``: ``bench/peers/picows_server.py``, the Cython library (uvloop).

(1) fan-out to 1,000 subscribers, in deliveries/s and server CPU per delivery. All four servers run
    at once, with 1,000 subscribers (``sub:bench``) and one publisher connection each. The rounds
    rotate over the servers, so a noisy neighbour hits all of them. The publisher sends
    ``pub:bench:<100 bytes>``, the same trigger for all four (``bench/peers/``). It keeps at most
    W publishes in flight (``--windows``, by default one pass with 16 and one with 1) for
    ``--seconds``. A round ends when every delivery has arrived. deliveries/s = publishes x 1,000 /
    (last delivery - first publish). Server CPU = utime+stime of the server process
    (``/proc/PID/stat``) over the same span. Pings are off.
(2) 10,000 idle connections pinged every 5 s. Each server runs alone. Ours is ``python -m tank_cli
    serve`` with its defaults, which send a Ping and the text ``heartbeat`` every 5 s. The peers
    ping every 5 s. The load answers every Ping with a Pong. Once the connections are open and one
    interval has passed, a 30 s window gives the server's CPU % and its RSS growth per connection:
    ``VmRSS`` at the end minus ``VmRSS`` before the first connection, divided by the connection count.

The load generator uses raw uvloop sockets with a hand-written client handshake. After the Hello
frame, each subscriber only counts bytes, since every frame on the topic is the same size. Every
round checks the exact byte count, and checks the content of the last frame on a sample of
subscribers.

Usage: ``python bench/server_bench.py [--quick] [--only fanout,idle] [--servers a,b] [--windows 16,1]
[--profile] [--out PATH]``. Results also go to ``bench/results/server_bench.json``. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
RESULTS = HERE / "results" / "server_bench.json"
PYTHON = sys.executable

SERVER_CPU = 0
LOAD_CPU = 1
HOST = "127.0.0.1"
TOPIC = "bench"
DATA_BYTES = 100
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: any 16 bytes in base64 will do
CLK_TCK = os.sysconf("SC_CLK_TCK")

NAMES = ("tank-asyncio", "tank-trio", "websockets", "picows")
LABELS = {"tank-asyncio": "tank asyncio", "tank-trio": "tank trio", "websockets": "websockets",
          "picows": "picows"}
#: Quoted in issue 3: the peers measured on a 2-core machine like ours (fan-out: deliveries/s and
#: us of server CPU per delivery; idle at 10,000 connections: KiB per connection and CPU %).
REFERENCE = {
    "websockets": {"deliveries_per_s": 111_000, "us_per_delivery": 8.9, "kib_per_conn": 15.7,
                   "cpu_pct": 14.6},
    "picows": {"deliveries_per_s": 185_000, "us_per_delivery": 5.3, "kib_per_conn": 29.7, "cpu_pct": 8.6},
}


def fanout_command(name: str) -> list[str]:
    if name.startswith("tank-"):
        return [PYTHON, str(PEERS / "tank_embedded.py"), "--backend", name.removeprefix("tank-")]
    return [PYTHON, str(PEERS / f"{name}_server.py")]


def idle_command(name: str, interval: float) -> list[str]:
    if name.startswith("tank-"):
        # The real command line with its defaults (text heartbeat on; 5 s / 15 s are the defaults too).
        return [PYTHON, "-m", "tank_cli", "serve", "--port", "0", "--backend",
                name.removeprefix("tank-"), "--heartbeat-interval", f"{interval:g}",
                "--heartbeat-timeout", f"{3 * interval:g}",
                "--max-connections-per-address", "off"]  # all 10,000 come from loopback
    return [PYTHON, str(PEERS / f"{name}_server.py"), "--ping-interval", f"{interval:g}"]


# --------------------------------------------------------------------------- /proc


def proc_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` (all its threads), in seconds: user and kernel CPU."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    return sum(proc_times(pid))


def proc_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (``schedstat``): how
    much a busy neighbour on the server's CPU held it back."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def proc_rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(cpu: int) -> Callable[[], None]:
    def pre_exec() -> None:  # what `taskset -c CPU` does
        os.sched_setaffinity(0, {cpu})

    return pre_exec


# --------------------------------------------------------------------------- the wire (client side)


def data_for(seq: int) -> str:
    """The publish data of publish ``seq``: exactly DATA_BYTES ASCII bytes, nothing to escape."""
    return f"seq {seq:012d} price update EURUSD bid 1.08342 ask 1.08351 vol 2500000 venue LDN ".ljust(
        DATA_BYTES, "~")


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame with the all-zero masking key (RFC 6455 allows any key)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def server_frame(payload: bytes) -> bytes:
    """The unmasked text frame every server must send for ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def delivery_frame(seq: int) -> bytes:
    envelope = '{"topic":' + json.dumps(TOPIC) + ',"data":' + json.dumps(data_for(seq)) + "}"
    return server_frame(envelope.encode())


def pub_frame(seq: int) -> bytes:
    return client_frame(f"pub:{TOPIC}:{data_for(seq)}".encode())


class Group:
    """The clients of one server, and (fan-out) the publishing state of its rounds."""

    def __init__(self, name: str, url: str, pid: int, frame_size: int = 0) -> None:
        self.name = name
        self.pid = pid
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)?$", url)
        if match is None:
            raise ValueError(f"bad URL {url!r}")
        self.host, self.port, self.path = match.group(1), int(match.group(2)), match.group(3) or "/"
        self.frame_size = frame_size
        self.clients: list[Client] = []
        self.subscribers: list[Client] = []
        self.publisher: Client | None = None
        self.lost = 0
        # fan-out accounting: bytes counted by all subscribers since they subscribed
        self.total = 0
        self.mark = float("inf")
        self.base = 0
        self.sent = 0
        self.seq = 0
        self.window = 16
        self.publishing = False
        self.deadline = 0.0
        self.done: asyncio.Future[tuple[float, float]] | None = None

    def request(self, user_id: str) -> bytes:
        return (f"GET {self.path}?user_id={user_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()

    # ---- the publisher's flow control, called from the subscribers' data_received

    def progress(self) -> None:
        subs = len(self.subscribers)
        size = self.frame_size
        now = time.perf_counter()
        if self.publishing and now >= self.deadline:
            self.publishing = False
        if self.publishing:
            delivered = (self.total - self.base) // size
            in_flight = self.sent - delivered // subs
            k = self.window - in_flight
            if k > 0:
                assert self.publisher is not None and self.publisher.transport is not None
                first = self.seq
                self.publisher.transport.write(b"".join(pub_frame(first + i) for i in range(k)))
                self.seq += k
                self.sent += k
            # come back as soon as one more publish has reached every subscriber (so the load
            # itself batches nothing: pub frames pile up only when a server falls behind)
            self.mark = self.base + (self.sent - self.window + 1) * subs * size
            return
        target = self.base + self.sent * subs * size
        if self.total >= target:
            self.mark = float("inf")
            if self.done is not None and not self.done.done():
                self.done.set_result((now, proc_times(self.pid)))
        else:
            self.mark = target


class Client(asyncio.Protocol):
    """One raw WebSocket client: handshake, Hello, then either count bytes (subscriber) or parse
    frames (publisher, idle), answering each Ping with a Pong."""

    def __init__(self, group: Group, user_id: str, *, subscriber: bool = False,
                 checker: bool = False) -> None:
        self.group = group
        self.user_id = user_id
        self.subscriber = subscriber
        self.checker = checker
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.in_http = True
        self.counting = False
        self.nbytes = 0  # subscriber: bytes since the Hello
        self.tail = b""
        self.pings = 0
        self.texts = 0
        self.close_code: int | None = None
        self.lost = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(self.group.request(self.user_id))

    def data_received(self, data: bytes) -> None:
        if self.counting:  # the hot path of the fan-out
            n = len(data)
            self.nbytes += n
            group = self.group
            group.total += n
            if self.checker:
                self.tail = (self.tail + data)[-group.frame_size:]
            if group.total >= group.mark:
                group.progress()
            return
        self.buf += data
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.group.lost += 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost before the Hello: {exc or 'closed'}"))

    # ---- parsing

    def _parse(self) -> None:
        buf = self.buf
        if self.in_http:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(f"refused: {bytes(buf[:60])!r}"))
                assert self.transport is not None
                self.transport.abort()
                return
            del buf[:end + 4]
            self.in_http = False
        while len(buf) >= 2:
            b1 = buf[1] & 0x7F
            offset = 2
            if b1 == 126:
                if len(buf) < 4:
                    return
                b1 = int.from_bytes(buf[2:4], "big")
                offset = 4
            elif b1 == 127:
                if len(buf) < 10:
                    return
                b1 = int.from_bytes(buf[2:10], "big")
                offset = 10
            end = offset + b1
            if len(buf) < end:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset:end])
            del buf[:end]
            if opcode == 0x9:
                self.pings += 1
                assert self.transport is not None
                self.transport.write(client_frame(payload, 0xA))
            elif opcode in (0x1, 0x2):
                if not self.opened.done():
                    if not payload.startswith(b"Hello, "):
                        self.opened.set_exception(ConnectionError(f"first frame {payload[:40]!r}"))
                        return
                    self.opened.set_result(None)
                    if self.subscriber:
                        assert self.transport is not None
                        self.transport.write(client_frame(f"sub:{TOPIC}".encode()))
                        self.counting = True
                        rest = bytes(buf)
                        buf.clear()
                        if rest:
                            self.data_received(rest)
                        return
                else:
                    self.texts += 1
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                assert self.transport is not None
                self.transport.close()
                return


async def open_clients(group: Group, count: int, make: Callable[[int], Client], concurrency: int,
                       timeout: float = 60.0) -> list[Client]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Client:
        async with gate:
            client = make(i)
            await loop.create_connection(lambda: client, group.host, group.port)
            await asyncio.wait_for(client.opened, timeout)
            return client

    clients = await asyncio.gather(*(one(i) for i in range(count)))
    group.clients.extend(clients)
    return clients


def abort_all(groups: list[Group]) -> None:
    for group in groups:
        for client in group.clients:
            if client.transport is not None and not client.lost:
                client.transport.abort()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- load: fan-out


async def load_fanout(spec: dict[str, Any]) -> dict[str, Any]:
    frame_size = len(delivery_frame(0))
    subs = spec["subscribers"]
    groups = [Group(s["name"], s["url"], s["pid"], frame_size) for s in spec["servers"]]
    for group in groups:
        t = time.perf_counter()
        [group.publisher] = await open_clients(group, 1, lambda i, g=group: Client(g, "publisher"),
                                               spec["concurrency"])
        group.subscribers = await open_clients(
            group, subs, lambda i, g=group: Client(g, f"sub{i}", subscriber=True, checker=i % 100 == 0),
            spec["concurrency"])
        log(f"  {group.name}: {subs} subscribers + 1 publisher open in {time.perf_counter() - t:.1f} s")
    # No acknowledgement exists for sub:, so publish until every subscriber has seen one frame.
    for group in groups:
        assert group.publisher is not None and group.publisher.transport is not None
        t = time.perf_counter()
        while min(s.nbytes for s in group.subscribers) < frame_size:
            if time.perf_counter() - t > 30:
                raise RuntimeError(f"{group.name}: subscriptions not effective after 30 s")
            group.publisher.transport.write(pub_frame(group.seq))
            group.seq += 1
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    for group in groups:
        bad = [s.user_id for s in group.subscribers if s.nbytes % frame_size]
        if bad:
            raise RuntimeError(f"{group.name}: unexpected frames on {len(bad)} subscribers")

    gc.collect()
    gc.freeze()
    gc.disable()  # the load generator's own pauses are not what is measured

    async def one_round(group: Group, seconds: float) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        group.base = group.total
        group.sent = 0
        checkers = [(s, s.nbytes) for s in group.subscribers if s.checker]
        group.done = loop.create_future()
        own0 = time.process_time()
        wait0 = proc_wait(group.pid)
        user0, sys0 = proc_times(group.pid)
        t0 = time.perf_counter()
        group.deadline = t0 + seconds
        group.publishing = True
        group.progress()
        t1, (user1, sys1) = await asyncio.wait_for(group.done, seconds + 60)
        cpu = user1 - user0 + sys1 - sys0
        own1 = time.process_time()
        wait1 = proc_wait(group.pid)
        deliveries = group.sent * subs
        await asyncio.sleep(0.15)  # nothing more may arrive
        if group.total != group.base + deliveries * frame_size:
            raise RuntimeError(f"{group.name}: {group.total - group.base} bytes, expected "
                               f"{deliveries * frame_size}")
        last = delivery_frame(group.seq - 1)
        for sub, before in checkers:
            if sub.nbytes - before != group.sent * frame_size or sub.tail != last:
                raise RuntimeError(f"{group.name}: {sub.user_id} got the wrong bytes")
        if group.lost:
            raise RuntimeError(f"{group.name}: {group.lost} connections lost")
        elapsed = t1 - t0
        return {
            "publishes": group.sent,
            "deliveries": deliveries,
            "seconds": elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "server_cpu_s": cpu,
            "server_us_per_delivery": cpu / deliveries * 1e6,
            "server_user_us_per_delivery": (user1 - user0) / deliveries * 1e6,
            "server_sys_us_per_delivery": (sys1 - sys0) / deliveries * 1e6,
            "deliveries_per_cpu_s": deliveries / max(cpu, 1e-9),
            "server_cpu_pct": cpu / elapsed * 100,
            "server_wait_pct": (wait1 - wait0) / elapsed * 100,
            "loadgen_cpu_pct": (own1 - own0) / elapsed * 100,
        }

    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for window in spec["windows"]:
        for group in groups:  # warm-up, not recorded
            group.window = window
            await one_round(group, spec["warmup"])
        by_server: dict[str, list[dict[str, float]]] = {g.name: [] for g in groups}
        samples[str(window)] = by_server
        for rep in range(spec["reps"]):
            order = groups[rep % len(groups):] + groups[:rep % len(groups)]
            for group in order:
                sample = await one_round(group, spec["seconds"])
                by_server[group.name].append(sample)
                log(f"  window {window:>2} rep {rep + 1}/{spec['reps']} {group.name:<13} "
                    f"{sample['deliveries_per_s']:>10,.0f} "
                    f"deliveries/s  {sample['server_us_per_delivery']:5.2f} us/delivery  server CPU "
                    f"{sample['server_cpu_pct']:3.0f} % (waiting {sample['server_wait_pct']:3.0f} %)  "
                    f"load CPU {sample['loadgen_cpu_pct']:3.0f} %")
                await asyncio.sleep(0.1)
    abort_all(groups)
    gc.enable()
    return {"frame_bytes": frame_size, "samples": samples}


# --------------------------------------------------------------------------- load: idle


async def load_idle(spec: dict[str, Any]) -> dict[str, Any]:
    group = Group(spec["name"], spec["url"], spec["pid"])
    count = spec["connections"]
    rss0 = proc_rss(group.pid)
    cpu0 = proc_cpu(group.pid)
    t = time.perf_counter()
    clients = await open_clients(group, count, lambda i: Client(group, f"idle{i}"), spec["concurrency"])
    connect_s = time.perf_counter() - t
    connect_cpu = proc_cpu(group.pid) - cpu0
    log(f"  {group.name}: {count:,} connections open in {connect_s:.1f} s")
    gc.collect()
    gc.freeze()
    await asyncio.sleep(spec["settle"])
    rss1 = proc_rss(group.pid)
    pings1 = [c.pings for c in clients]
    texts1 = sum(c.texts for c in clients)
    user1, sys1 = proc_times(group.pid)
    cpu1 = user1 + sys1
    wait1 = proc_wait(group.pid)
    own1 = time.process_time()
    t1 = time.perf_counter()
    profiler = Profiler(group.pid, Path(spec["profile"])) if spec.get("profile") else None  # the window only
    await asyncio.sleep(spec["hold"])
    wait2 = proc_wait(group.pid)
    user2, sys2 = proc_times(group.pid)
    cpu2 = user2 + sys2
    own2 = time.process_time()
    t2 = time.perf_counter()
    rss2 = proc_rss(group.pid)
    window = t2 - t1
    if profiler is not None:
        profiler.stop()
    pings = sorted(c.pings - p for c, p in zip(clients, pings1, strict=True))
    texts = sum(c.texts for c in clients) - texts1
    closed = sum(1 for c in clients if c.lost)
    abort_all([group])
    await asyncio.sleep(0.2)
    intervals = window / spec["interval"]
    return {
        "connections": count,
        "connect_s": connect_s,
        "connect_server_cpu_us_per_conn": connect_cpu / count * 1e6,
        "rss_before_bytes": rss0,
        "rss_after_settle_bytes": rss1,
        "rss_after_window_bytes": rss2,
        "bytes_per_connection": (rss2 - rss0) / count,
        "kib_per_connection": (rss2 - rss0) / count / 1024,
        "window_s": window,
        "server_cpu_s": cpu2 - cpu1,
        "server_cpu_pct": (cpu2 - cpu1) / window * 100,
        "server_user_pct": (user2 - user1) / window * 100,
        "server_sys_pct": (sys2 - sys1) / window * 100,
        "server_wait_pct": (wait2 - wait1) / window * 100,
        "server_us_per_ping": (cpu2 - cpu1) / max(1, sum(pings)) * 1e6,
        "loadgen_cpu_pct": (own2 - own1) / window * 100,
        "pings_per_conn_per_interval": {
            "min": pings[0] / intervals, "median": statistics.median(pings) / intervals,
            "max": pings[-1] / intervals},
        "text_frames_per_conn_per_interval": texts / count / intervals,
        "closed_during_run": closed,
    }


def run_load(load: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], spec_text: str) -> int:
    """A load generator process: run ``load(spec)`` on uvloop, print its ``RESULT`` line."""
    import uvloop

    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(load(json.loads(spec_text)))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def loadgen_main(mode: str, spec_text: str) -> int:
    return run_load(load_fanout if mode == "fanout" else load_idle, spec_text)


# --------------------------------------------------------------------------- orchestration


class ServerProcess:
    """A server under test: its own process, pinned to SERVER_CPU, announcing its URL on stdout."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL, preexec_fn=pin(SERVER_CPU))
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = re.search(r"ws://\S+", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"{name} did not start: {line!r} {self.stderr()}")
        self.url = match.group(0)
        self.pid = self.proc.pid

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


class Profiler:
    """``py-spy record`` (sampling, out of process, non-blocking) on one server, pinned to the load's
    CPU; SIGINT makes it write collapsed stacks (``--format raw``) to ``path``."""

    def __init__(self, pid: int, path: Path) -> None:
        exe = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                      "--nonblocking", "-o", str(path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=pin(LOAD_CPU))

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return summarize_stacks(self.path)


def summarize_stacks(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares of samples by leaf line (own time) and by line on the stack (inclusive)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [frame.replace(str(ROOT) + "/", "") for frame in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n

    def shares(table: dict[str, int]) -> list[list[Any]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [[frame, round(n / max(total, 1), 4)] for frame, n in best]

    return {"file": str(path), "samples": total, "own": shares(own), "inclusive": shares(inclusive)}


def print_profile(label: str, prof: dict[str, Any]) -> None:
    print(f"--- py-spy: {label}, {prof['samples']} samples ({prof['file']})")
    print("  own time by line:")
    for frame, share in prof["own"]:
        print(f"    {share:6.1%}  {frame}")
    print("  on the stack:")
    for frame, share in prof["inclusive"]:
        print(f"    {share:6.1%}  {frame}")


def run_loadgen(
    mode: str, spec: dict[str, Any], timeout: float, script: str = __file__
) -> dict[str, Any]:
    """Run ``script --loadgen MODE`` pinned to the load CPU; its last ``RESULT`` line, parsed."""
    command = [PYTHON, str(Path(script).resolve()), "--loadgen", mode, "--spec", json.dumps(spec)]
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, timeout=timeout,
                          preexec_fn=pin(LOAD_CPU), check=False)
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load generator ({mode}) failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def bench_fanout(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    log(f"(1) fan-out: starting {', '.join(opts.servers)}")
    servers = [ServerProcess(name, fanout_command(name)) for name in opts.servers]
    profilers = {s.name: Profiler(s.pid, opts.out.parent / f"profile-fanout-{s.name}.txt")
                 for s in servers} if opts.profile else {}
    try:
        spec = {
            "servers": [{"name": s.name, "url": s.url, "pid": s.pid} for s in servers],
            "subscribers": opts.subscribers,
            "reps": opts.reps,
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "windows": opts.windows,
            "concurrency": 64,
        }
        raw = run_loadgen("fanout", spec, timeout=600)
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited: {server.stderr()}")
    finally:
        profiles = {name: prof.stop() for name, prof in profilers.items()}
        for server in servers:
            server.stop()
    if profiles:
        out.setdefault("profiles", {})["fanout"] = profiles
    result: dict[str, Any] = {
        "subscribers": opts.subscribers,
        "data_bytes": DATA_BYTES,
        "frame_bytes": raw["frame_bytes"],
        "seconds_per_round": opts.seconds,
        "reps": opts.reps,
        "windows": {},
    }
    for window, samples in raw["samples"].items():
        block: dict[str, Any] = {"servers": {}, "ratios": {}}
        result["windows"][window] = block
        for name, rounds in samples.items():
            block["servers"][name] = {
                key: summary([r[key] for r in rounds])
                for key in ("deliveries_per_s", "deliveries_per_cpu_s", "server_us_per_delivery",
                            "server_user_us_per_delivery", "server_sys_us_per_delivery", "server_cpu_pct",
                            "server_wait_pct", "loadgen_cpu_pct", "publishes", "seconds")
            }
        for key in ("deliveries_per_s", "deliveries_per_cpu_s"):
            for a, b in (("tank-asyncio", "picows"), ("tank-trio", "tank-asyncio"),
                         ("tank-asyncio", "websockets"), ("tank-trio", "picows"),
                         ("tank-trio", "websockets"), ("picows", "websockets")):
                if a in samples and b in samples:  # paired: the same round index, back to back
                    values = [x[key] / y[key] for x, y in zip(samples[a], samples[b], strict=True)]
                    block["ratios"].setdefault(key, {})[f"{a}/{b}"] = summary(values)
    out["fanout"] = result


def bench_idle(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    result: dict[str, Any] = {"connections": opts.connections, "interval_s": opts.interval,
                              "settle_s": opts.settle, "hold_s": opts.hold, "servers": {}}
    for name in opts.servers:
        log(f"(2) idle: {name}, {opts.connections:,} connections, pinged every {opts.interval:g} s")
        server = ServerProcess(name, idle_command(name, opts.interval))
        profile = opts.out.parent / f"profile-idle-{name}.txt"
        try:
            spec = {"name": name, "url": server.url, "pid": server.pid, "connections": opts.connections,
                    "concurrency": 64, "settle": opts.settle, "hold": opts.hold, "interval": opts.interval,
                    "profile": str(profile) if opts.profile else None}
            res = run_loadgen("idle", spec, timeout=600)
            if server.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {server.stderr()}")
        finally:
            server.stop()
        if opts.profile:
            out.setdefault("profiles", {}).setdefault("idle", {})[name] = summarize_stacks(profile)
        log(f"  {name}: {res['kib_per_connection']:.1f} KiB/conn, CPU {res['server_cpu_pct']:.1f} %, "
            f"pings/conn/interval {res['pings_per_conn_per_interval']['median']:.2f}, "
            f"closed {res['closed_during_run']}")
        result["servers"][name] = res
    s = result["servers"]
    ratios = {}
    for a, b in (("tank-asyncio", "picows"), ("tank-trio", "picows"), ("tank-asyncio", "websockets"),
                 ("tank-trio", "websockets"), ("tank-trio", "tank-asyncio")):
        if a in s and b in s:
            ratios[f"{a}/{b}/memory"] = s[a]["bytes_per_connection"] / s[b]["bytes_per_connection"]
            ratios[f"{a}/{b}/cpu"] = s[a]["server_cpu_pct"] / max(1e-9, s[b]["server_cpu_pct"])
    result["ratios"] = ratios
    out["idle"] = result


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def mmm(stat: dict[str, Any]) -> str:
    return f"{fmt(stat['median']):>9} [{fmt(stat['min'])}-{fmt(stat['max'])}]"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print()
    print(f"Tank server benchmark: Python {env['python']}, uvloop {env['uvloop']}, trio {env['trio']}, "
          f"websockets {env['websockets']}, picows {env['picows']}, {env['cpus']} CPUs, "
          f"commit {env['commit']}, "
          f"{'quick' if res['quick'] else 'full'} run; server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}")
    f = res.get("fanout")
    for window, block in (f["windows"].items() if f else ()):
        print(f"(1) fan-out to {f['subscribers']:,} subscribers: {f['data_bytes']}-byte data, "
              f"{f['frame_bytes']}-byte frames, at most {window} publish{'es' if window != '1' else ''} in "
              f"flight, {f['reps']} rounds of {f['seconds_per_round']:g} s each (median [min-max])")
        print(f"  {'':<14}{'deliveries/s':>28}{'server CPU %':>20}{'waiting %':>10}{'us/delivery':>20}"
              f"{'user':>6}{'sys':>6}{'deliveries/CPU-s':>31}{'load CPU %':>11}")
        for name, s in block["servers"].items():
            print(f"  {LABELS[name]:<14}{mmm(s['deliveries_per_s']):>28}{mmm(s['server_cpu_pct']):>20}"
                  f"{fmt(s['server_wait_pct']['median']):>10}{mmm(s['server_us_per_delivery']):>20}"
                  f"{fmt(s['server_user_us_per_delivery']['median']):>6}"
                  f"{fmt(s['server_sys_us_per_delivery']['median']):>6}"
                  f"{mmm(s['deliveries_per_cpu_s']):>31}{fmt(s['loadgen_cpu_pct']['median']):>11}")
        print("  (server CPU % and waiting % are of the wall time; waiting = runnable while another process "
              "had CPU 0;\n   us/delivery = server utime+stime per delivery, split into user and sys)")
        # issue 9's targets: asyncio >= 3x picows with publishes in flight, trio >= 0.85x asyncio
        notes: dict[str, tuple[str, float | None]] = {
            "tank-trio/tank-asyncio": ("target >= 0.85", 0.85),
            "picows/websockets": ("issue 3's figures: 185k/111k = 1.67", None),
        }
        if window != "1":
            notes["tank-asyncio/picows"] = ("target >= 3 (publishes in flight)", 3.0)
        titles = {
            "deliveries_per_s": "ratios of deliveries/s, wall clock (median of per-round ratios [min-max]):",
            "deliveries_per_cpu_s": "ratios of deliveries per server CPU-second (= deliveries/s on a core of "
                                    "its own):",
        }
        for key, table in block["ratios"].items():
            print(f"  {titles[key]}")
            for pair, stat in table.items():
                note, target = notes.get(pair, ("", None))
                if target is not None:
                    note += f": {verdict(stat['median'] >= target)}"
                print(f"    {pair.replace('-', ' '):<28}{mmm(stat):>26}  {note}")
    i = res.get("idle")
    if i:
        print(f"(2) {i['connections']:,} idle connections pinged every {i['interval_s']:g} s, "
              f"{i['hold_s']:g} s window after {i['settle_s']:g} s settling")
        print(f"  {'':<14}{'KiB/conn':>10}{'CPU %':>8}{'user':>6}{'sys':>6}{'waiting %':>10}{'us/ping':>9}"
              f"{'pings/conn/5s':>15}"
              f"{'texts/conn/5s':>15}{'connect s':>11}{'closed':>8}")
        for name, s in i["servers"].items():
            print(f"  {LABELS[name]:<14}{s['kib_per_connection']:>10.1f}{s['server_cpu_pct']:>8.1f}"
                  f"{s['server_user_pct']:>6.1f}{s['server_sys_pct']:>6.1f}{s['server_wait_pct']:>10.1f}"
                  f"{s['server_us_per_ping']:>9.1f}{s['pings_per_conn_per_interval']['median']:>15.2f}"
                  f"{s['text_frames_per_conn_per_interval']:>15.2f}{s['connect_s']:>11.1f}"
                  f"{s['closed_during_run']:>8}")
        s = i["servers"]
        for name in ("tank-asyncio", "tank-trio"):
            if name in s:
                kib = s[name]["kib_per_connection"]
                line = f"    {LABELS[name]}: memory {kib:.1f} KiB/conn (target <= 10: {verdict(kib <= 10)})"
                if "picows" in s:
                    cpu, peer = s[name]["server_cpu_pct"], s["picows"]["server_cpu_pct"]
                    line += (f"; CPU {cpu:.1f} % vs picows {peer:.1f} % = {cpu / max(peer, 1e-9):.2f}x "
                             f"(target at most picows's: {verdict(cpu <= peer)})")
                print(line)
        for key, value in i["ratios"].items():
            print(f"    {key.replace('-', ' '):<34}{value:>8.2f}x")
    for section, profiles in res.get("profiles", {}).items():
        for name, prof in profiles.items():
            print_profile(f"{section}, {LABELS[name]}", prof)
    if res.get("profiles"):
        print("  (a --profile run: py-spy shares the load's CPU, so its figures are not for comparison)")
    print("  issue 3's figures for the peers (another 2-core machine): fan-out websockets 111k/s "
          "(8.9 us), picows 185k/s (5.3 us); idle websockets 15.7 KiB 14.6 %, picows 29.7 KiB 8.6 %")
    print(f"total {res['elapsed_s']:.0f} s; JSON: {res['json']}")


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tank_core", "tank_asyncio", "tank_cli",
                                "tank_trio"],
                               cwd=ROOT, capture_output=True, text=True, check=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--only", default="fanout,idle", help="sections to run: fanout,idle")
    parser.add_argument("--servers", default=",".join(NAMES),
                        help=f"servers to run (default {','.join(NAMES)})")
    parser.add_argument("--windows", default="16,1",
                        help="fan-out: publishes in flight, one pass each (default 16,1; 1 = lockstep)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample every server with py-spy (collapsed stacks next to the JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--loadgen", choices=("fanout", "idle"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.loadgen:
        return loadgen_main(opts.loadgen, opts.spec)
    opts.servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = set(opts.servers) - set(NAMES)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    opts.windows = [int(w) for w in opts.windows.split(",") if w.strip()]
    if not opts.windows or min(opts.windows) < 1:
        parser.error("--windows wants positive integers")
    opts.subscribers = 1000
    opts.interval = 5.0
    if opts.quick:
        opts.reps, opts.seconds, opts.warmup = 2, 1.0, 0.3
        opts.connections, opts.settle, opts.hold = 2000, 2.0, 10.0
    else:
        opts.reps, opts.seconds, opts.warmup = 5, 2.0, 0.5
        opts.connections, opts.settle, opts.hold = 10_000, 5.0, 30.0
    if len(os.sched_getaffinity(0) | {SERVER_CPU, LOAD_CPU}) > (os.cpu_count() or 1):
        parser.error(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}")
    os.sched_setaffinity(0, {LOAD_CPU})  # this process mostly waits; keep it off the server's CPU
    fd_limit = raise_fd_limit()

    res: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "server_cpu": SERVER_CPU,
            "loadgen_cpu": LOAD_CPU,
            "fd_limit": fd_limit,
            "loadavg_at_start": os.getloadavg(),
            "commit": _git_commit(),
            **{name: _version(name) for name in ("uvloop", "trio", "websockets", "picows", "wsproto", "h11")},
        },
        "quick": opts.quick,
        "profiled": opts.profile,
        "issue_3_peer_figures": REFERENCE,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start = time.perf_counter()
    if "fanout" in only:
        t = time.perf_counter()
        bench_fanout(opts, res)
        log(f"fan-out done in {time.perf_counter() - t:.0f} s")
    if "idle" in only:
        t = time.perf_counter()
        bench_idle(opts, res)
        log(f"idle done in {time.perf_counter() - t:.0f} s")
    res["environment"]["loadavg_at_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    res["json"] = str(opts.out)
    opts.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
