#!/usr/bin/env python3
"""Fan-out to 1,000 subscribers over real sockets: Tank as an ASGI application under uvicorn, against
our own asyncio adapter and python-socketio's ASGI application under uvicorn, same run, same load
(issue 13).

Each server is its own process pinned to CPU 0; one load generator process is pinned to CPU 1:

- ``tank-asgi``: ``tank_asgi.TankASGI`` mounted at ``/tank`` in a FastAPI application, uvicorn on
  uvloop with its default WebSocket implementation ``websockets-sansio``
  (``bench/peers/tank_asgi_app.py``); ``tank-asgi-legacy``: the same with ``--ws websockets``
  (uvicorn's older, deprecated implementation on websockets' legacy asyncio server);
  ``tank-asgi-bare``: ``TankASGI`` alone as the uvicorn application, no FastAPI (what mounting costs);
- ``tank-asyncio``: our asyncio adapter on uvloop, ``bench/peers/tank_embedded.py`` as
  ``server_bench.py`` runs it;
- ``socketio``: ``socketio.AsyncServer(async_mode="asgi")`` in ``socketio.ASGIApp``, uvicorn on
  uvloop, ``websockets-sansio`` (``bench/peers/socketio_asgi_app.py``); ``socketio-legacy`` (not run
  by default): the same with ``--ws websockets``.

Our servers get ``server_bench.py``'s trigger: the publisher connection sends ``pub:bench:<100 bytes>``
and an inline ``on_message`` hook calls ``publish("bench", data)``, which sends the 127-byte
``{"topic":"bench","data":...}`` (a 131-byte frame) to the 1,000 subscribers (``sub:bench``). Relay is
off, the heartbeat is out of the way, the rate and per-address limits are off. Socket.IO's
subscribers speak Engine.IO v4 / Socket.IO v5 over a raw WebSocket (``/socket.io/?EIO=4&transport=
websocket``: the server's open packet ``0{...}``, the client's ``40``, the server's ``40{...}``), then
emit ``42["join","bench"]``; the publisher emits ``42["pub","bench",<data>]`` and the server's handler
does ``await sio.emit("message", data, room="bench")``: each subscriber gets ``42["message",<data>]``
(116 bytes, a 118-byte frame). Engine.IO pings every 3,600 s, so none during a run; uvicorn's own
WebSocket pings are off.

The publisher keeps at most W publishes in flight (``--windows``, by default a pass with 16 and one
with 1, lockstep) for ``--seconds`` per round; a round ends when every delivery has arrived.
deliveries/s = publishes x 1,000 / (last delivery - first publish); server CPU = utime+stime of the
server process (``/proc/PID/stat``) over the same span. Rounds rotate over the servers (a noisy
neighbour hits all of them); ratios are medians of per-round ratios (same round index). As in
``server_bench.py`` the subscribers count bytes once subscribed: every frame of a server has one
size, so deliveries = bytes / frame size. After each round, every subscriber must have received
exactly publishes x frame size bytes, and 10 of them per server keep their bytes, which must be
exactly the expected frames of the round's publishes, in order (for Socket.IO: one ``42["message",
<data>]`` text frame per publish, nothing else).

Usage: ``.venv/bin/python bench/asgi_bench.py [--quick] [--servers a,b] [--windows 16,1] [--seconds S]
[--reps N] [--profile] [--py-spy]``. Results go to ``bench/results/asgi_bench.json``. See ``bench/README.md``.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_bench import (  # a sibling script, not a package
    DATA_BYTES,
    KEY,
    LOAD_CPU,
    PEERS,
    PYTHON,
    ROOT,
    SERVER_CPU,
    TOPIC,
    Client,
    Group,
    Profiler,
    ServerProcess,
    _version,
    client_frame,
    data_for,
    delivery_frame,
    fmt,
    log,
    open_clients,
    print_profile,
    proc_times,
    proc_wait,
    pub_frame,
    raise_fd_limit,
    run_load,
    run_loadgen,
    server_frame,
    summarize_stacks,
    summary,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "asgi_bench.json"
HOST = "127.0.0.1"

NAMES = ("tank-asgi", "tank-asgi-legacy", "tank-asgi-bare", "tank-asyncio", "socketio", "socketio-legacy")
DEFAULT = ("tank-asgi", "tank-asgi-legacy", "tank-asgi-bare", "tank-asyncio", "socketio")
LABELS = {
    "tank-asgi": "(a) TankASGI sansio",
    "tank-asgi-legacy": "(a') TankASGI legacy",
    "tank-asgi-bare": "TankASGI bare",
    "tank-asyncio": "(b) tank asyncio",
    "socketio": "(c) socketio sansio",
    "socketio-legacy": "(c') socketio legacy",
}
#: (numerator, denominator) of the ratios reported, when both ran.
PAIRS = (
    ("tank-asgi", "tank-asyncio"),
    ("tank-asgi", "socketio"),
    ("tank-asgi-legacy", "tank-asyncio"),
    ("tank-asgi-legacy", "socketio"),
    ("tank-asgi-legacy", "socketio-legacy"),
    ("tank-asgi-legacy", "tank-asgi"),
    ("tank-asgi-bare", "tank-asgi"),
    ("socketio-legacy", "socketio"),
    ("tank-asyncio", "socketio"),
)
CHECKERS = 10  # subscribers per server that keep and verify every byte


def command(name: str, profile: Path | None) -> list[str]:
    legacy = name.endswith("-legacy")
    ws = ["--ws", "websockets" if legacy else "websockets-sansio"]
    if name.startswith("tank-asgi"):
        cmd = [PYTHON, str(PEERS / "tank_asgi_app.py"), "--host", HOST, *ws]
        if name == "tank-asgi-bare":
            cmd += ["--mount", ""]
    elif name == "tank-asyncio":
        cmd = [PYTHON, str(PEERS / "tank_embedded.py"), "--host", HOST, "--backend", "asyncio"]
    else:
        cmd = [PYTHON, str(PEERS / "socketio_asgi_app.py"), "--host", HOST, *ws]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    return cmd


# --------------------------------------------------------------------------- the wire: Socket.IO


def sio_packet(*args: str) -> bytes:
    """A Socket.IO EVENT packet in an Engine.IO MESSAGE packet: ``42["name",args...]``, as
    python-socketio encodes it (compact JSON)."""
    return b"42" + json.dumps(list(args), separators=(",", ":")).encode()


def sio_delivery_frame(seq: int) -> bytes:
    return server_frame(sio_packet("message", data_for(seq)))


def sio_pub_frame(seq: int) -> bytes:
    return client_frame(sio_packet("pub", TOPIC, data_for(seq)))


# --------------------------------------------------------------------------- load: fan-out


class BenchGroup(Group):
    """``server_bench.Group`` for either protocol: its own pub and delivery frames."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.sio = spec["name"].startswith("socketio")
        self.delivery = sio_delivery_frame if self.sio else delivery_frame
        self.pub = sio_pub_frame if self.sio else pub_frame
        super().__init__(spec["name"], spec["url"], spec["pid"], len(self.delivery(0)))

    def request(self, user_id: str) -> bytes:
        if not self.sio:
            return super().request(user_id)
        return (f"GET {self.path}?EIO=4&transport=websocket HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()

    def progress(self) -> None:  # server_bench.Group.progress with this group's pub frames
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
                self.publisher.transport.write(b"".join(self.pub(first + i) for i in range(k)))
                self.seq += k
                self.sent += k
            self.mark = self.base + (self.sent - self.window + 1) * subs * size
            return
        target = self.base + self.sent * subs * size
        if self.total >= target:
            self.mark = float("inf")
            if self.done is not None and not self.done.done():
                self.done.set_result((now, proc_times(self.pid)))
        else:
            self.mark = target



class TankClient(Client):
    """``server_bench.Client``; a keeper also keeps every byte it counts, for ``verify``."""

    def __init__(self, group: BenchGroup, user_id: str, *, subscriber: bool = False,
                 keeper: bool = False) -> None:
        super().__init__(group, user_id, subscriber=subscriber)
        self.keeper = keeper
        self.kept = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.keeper and self.counting:
            self.kept += data
        super().data_received(data)


class SioClient(TankClient):
    """A raw Engine.IO v4 / Socket.IO v5 client over WebSocket: answers the open packet with
    ``40``, takes ``40{...}`` as opened; a subscriber then emits ``join`` and counts bytes."""

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
        assert self.transport is not None
        while len(buf) >= 2:
            length, offset = buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + length:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset:offset + length])
            del buf[:offset + length]
            if opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.transport.close()
                return
            if opcode == 0x9:
                self.transport.write(client_frame(payload, 0xA))
            if opcode != 0x1:
                continue
            if payload.startswith(b"0{"):  # Engine.IO open: connect the default namespace
                self.transport.write(client_frame(b"40"))
            elif payload == b"2":  # Engine.IO ping
                self.pings += 1
                self.transport.write(client_frame(b"3"))
            elif payload.startswith(b"40") and not self.opened.done():
                self.opened.set_result(None)
                if self.subscriber:
                    self.transport.write(client_frame(sio_packet("join", TOPIC)))
                    self.counting = True
                    rest = bytes(buf)
                    buf.clear()
                    if rest:
                        self.data_received(rest)
                    return
            elif payload.startswith(b"44") and not self.opened.done():
                self.opened.set_exception(ConnectionError(f"connect refused: {payload[:80]!r}"))
                return
            else:
                self.texts += 1


async def load_fanout(spec: dict[str, Any]) -> dict[str, Any]:
    subs = spec["subscribers"]
    groups = [BenchGroup(s) for s in spec["servers"]]
    every = subs // CHECKERS
    for group in groups:
        t = time.perf_counter()
        kind = SioClient if group.sio else TankClient

        def publisher(i: int, g: BenchGroup = group, k: type[TankClient] = kind) -> Client:
            return k(g, "publisher")

        def subscriber(i: int, g: BenchGroup = group, k: type[TankClient] = kind) -> Client:
            return k(g, f"sub{i}", subscriber=True, keeper=i % every == 0)

        [group.publisher] = await open_clients(group, 1, publisher, spec["concurrency"])
        group.subscribers = await open_clients(group, subs, subscriber, spec["concurrency"])
        log(f"  {group.name}: {subs} subscribers + 1 publisher open in {time.perf_counter() - t:.1f} s "
            f"({group.frame_size}-byte frames)")
    # No acknowledgement exists for sub: (nor for our join), so publish until every subscriber has
    # seen one delivery, then until nothing more arrives.
    for group in groups:
        assert group.publisher is not None and group.publisher.transport is not None
        t = time.perf_counter()
        while min(s.nbytes for s in group.subscribers) < group.frame_size:
            if time.perf_counter() - t > 30:
                raise RuntimeError(f"{group.name}: subscriptions not effective after 30 s")
            group.publisher.transport.write(group.pub(group.seq))
            group.seq += 1
            await asyncio.sleep(0.02)
    for group in groups:
        total, t = -1, time.perf_counter()
        while total != group.total:
            if time.perf_counter() - t > 60:
                raise RuntimeError(f"{group.name}: deliveries still arriving after 60 s")
            total = group.total
            await asyncio.sleep(0.3)
        bad = [s.user_id for s in group.subscribers if s.nbytes % group.frame_size]
        if bad:
            raise RuntimeError(f"{group.name}: unexpected frames on {len(bad)} subscribers")

    gc.collect()
    gc.freeze()
    gc.disable()  # the load generator's own pauses are not what is measured

    async def one_round(group: BenchGroup, seconds: float) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        size = group.frame_size
        keepers = [s for s in group.subscribers if isinstance(s, TankClient) and s.keeper]
        for keeper in keepers:
            keeper.kept.clear()
        before = [s.nbytes for s in group.subscribers]
        seq0 = group.seq
        group.base = group.total
        group.sent = 0
        group.done = loop.create_future()
        own0 = time.process_time()
        wait0 = proc_wait(group.pid)
        user0, sys0 = proc_times(group.pid)
        t0 = time.perf_counter()
        group.deadline = t0 + seconds
        group.publishing = True
        group.progress()
        t1, (user1, sys1) = await asyncio.wait_for(group.done, seconds + 60)
        own1 = time.process_time()
        wait1 = proc_wait(group.pid)
        cpu = user1 - user0 + sys1 - sys0
        deliveries = group.sent * subs
        await asyncio.sleep(0.15)  # nothing more may arrive
        if group.total != group.base + deliveries * size:
            raise RuntimeError(f"{group.name}: {group.total - group.base} bytes, "
                               f"expected {deliveries * size}")
        for sub, nbytes in zip(group.subscribers, before, strict=True):
            if sub.nbytes - nbytes != group.sent * size:
                raise RuntimeError(f"{group.name}: {sub.user_id} got {sub.nbytes - nbytes} bytes, expected "
                                   f"{group.sent * size}")
        expected = b"".join(group.delivery(seq) for seq in range(seq0, group.seq))
        for keeper in keepers:
            if keeper.kept != expected:
                raise RuntimeError(f"{group.name}: {keeper.user_id} got other bytes than the round's "
                                   f"{group.sent} frames in order")
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
            "loadavg_1min": os.getloadavg()[0],
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
                log(f"  window {window:>2} rep {rep + 1}/{spec['reps']} {group.name:<16} "
                    f"{sample['deliveries_per_s']:>10,.0f} deliveries/s  "
                    f"{sample['server_us_per_delivery']:6.2f} us/delivery  server CPU "
                    f"{sample['server_cpu_pct']:3.0f} % (waiting {sample['server_wait_pct']:3.0f} %)  "
                    f"load CPU {sample['loadgen_cpu_pct']:3.0f} %  loadavg {sample['loadavg_1min']:.2f}")
                await asyncio.sleep(0.1)
    for group in groups:
        for client in [group.publisher, *group.subscribers]:
            if client is not None and client.transport is not None and not client.lost:
                client.transport.abort()
    gc.enable()
    return {"frame_bytes": {g.name: g.frame_size for g in groups}, "samples": samples}


# --------------------------------------------------------------------------- orchestration

KEYS = ("deliveries_per_s", "server_us_per_delivery", "server_user_us_per_delivery",
        "server_sys_us_per_delivery", "deliveries_per_cpu_s", "server_cpu_pct", "server_wait_pct",
        "loadgen_cpu_pct", "publishes", "seconds", "loadavg_1min")


def bench_fanout(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    log(f"fan-out: starting {', '.join(opts.servers)}")
    servers: list[ServerProcess] = []
    profiles: dict[str, Path] = {}
    samplers: dict[str, Profiler] = {}
    try:
        for name in opts.servers:
            profile = None
            if opts.profile:
                profile = profiles[name] = opts.out.parent / f"profile-asgi-{name}.pstats"
                profile.parent.mkdir(parents=True, exist_ok=True)
            servers.append(ServerProcess(name, command(name, profile)))
        spec = {
            "servers": [{"name": s.name, "url": s.url, "pid": s.pid} for s in servers],
            "subscribers": opts.subscribers,
            "reps": opts.reps,
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "windows": opts.windows,
            "concurrency": 64,
        }
        samplers = {s.name: Profiler(s.pid, opts.out.parent / f"py-spy-asgi-{s.name}.txt")
                    for s in servers} if opts.py_spy else {}
        try:
            raw = run_loadgen("fanout", spec, timeout=900, script=__file__)
        finally:
            for sampler in samplers.values():
                sampler.stop()
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited: {server.stderr()}")
    finally:
        for server in servers:
            server.stop()
    result: dict[str, Any] = {
        "subscribers": opts.subscribers,
        "data_bytes": DATA_BYTES,
        "frame_bytes": raw["frame_bytes"],
        "seconds_per_round": opts.seconds,
        "reps": opts.reps,
        "urls": {s.name: s.url for s in servers},
        "windows": {},
    }
    for window, samples in raw["samples"].items():
        block: dict[str, Any] = {"servers": {}, "ratios": {}}
        result["windows"][window] = block
        for name, rounds in samples.items():
            block["servers"][name] = {key: summary([r[key] for r in rounds]) for key in KEYS}
        for key in ("deliveries_per_s", "server_us_per_delivery"):
            for a, b in PAIRS:
                if a in samples and b in samples:  # paired: the same round index
                    values = [x[key] / y[key] for x, y in zip(samples[a], samples[b], strict=True)]
                    block["ratios"].setdefault(key, {})[f"{a}/{b}"] = summary(values)
    out["fanout"] = result
    if profiles:
        from compression_bench import top_functions

        out["profiles"] = {name: top_functions(path, top=25) for name, path in profiles.items()}
    if samplers:
        out["py_spy"] = {name: summarize_stacks(sampler.path, top=25) for name, sampler in samplers.items()}


# --------------------------------------------------------------------------- report


def mmm(stat: dict[str, Any]) -> str:
    return f"{fmt(stat['median']):>8} [{fmt(stat['min'])}-{fmt(stat['max'])}]"


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print()
    print(f"ASGI fan-out benchmark: Python {env['python']}, uvicorn {env['uvicorn']}, "
          f"uvloop {env['uvloop']}, websockets {env['websockets']}, FastAPI {env['fastapi']}, "
          f"python-socketio {env['python-socketio']}, python-engineio {env['python-engineio']}, "
          f"{env['cpus']} CPUs, commit {env['commit']}, {'quick' if res['quick'] else 'full'} run"
          f"{', PROFILED' if res['profiled'] else ''}; server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}; "
          f"load average {env['loadavg_at_start'][0]:.2f} at start, {env['loadavg_at_end'][0]:.2f} at end")
    f = res["fanout"]
    frames = ", ".join(f"{LABELS[n]} {b}" for n, b in f["frame_bytes"].items())
    for window, block in f["windows"].items():
        print(f"fan-out to {f['subscribers']:,} subscribers, {f['data_bytes']}-byte data, at most {window} "
              f"publish{'es' if window != '1' else ''} in flight, {f['reps']} rounds of "
              f"{f['seconds_per_round']:g} s each, interleaved (median [min-max])")
        print(f"  {'':<22}{'deliveries/s':>28}{'us CPU/delivery':>22}{'user':>6}{'sys':>6}"
              f"{'server CPU %':>20}{'waiting %':>10}{'load CPU %':>11}{'spread %':>9}")
        for name, s in block["servers"].items():
            d = s["deliveries_per_s"]
            spread = (d["max"] - d["min"]) / d["median"] * 100
            print(f"  {LABELS[name]:<22}{mmm(d):>28}{mmm(s['server_us_per_delivery']):>22}"
                  f"{fmt(s['server_user_us_per_delivery']['median']):>6}"
                  f"{fmt(s['server_sys_us_per_delivery']['median']):>6}{mmm(s['server_cpu_pct']):>20}"
                  f"{fmt(s['server_wait_pct']['median']):>10}{fmt(s['loadgen_cpu_pct']['median']):>11}"
                  f"{spread:>9.0f}")
        titles = {"deliveries_per_s": "ratios of deliveries/s (median of per-round ratios [min-max]):",
                  "server_us_per_delivery": "ratios of server CPU per delivery (> 1: the first costs more):"}
        for key, table in block["ratios"].items():
            print(f"  {titles[key]}")
            for pair, stat in table.items():
                a, b = pair.split("/")
                print(f"    {LABELS[a] + ' / ' + LABELS[b]:<48}{mmm(stat):>26}")
    print(f"  frame bytes: {frames}; spread = (max-min)/median of deliveries/s; waiting = runnable "
          "while something\n  else had CPU 0; load CPU % near 100 means the load generator, not the "
          "server, set the pace")
    for name, prof in res.get("profiles", {}).items():
        if "own" not in prof:
            print(f"--- cProfile: {LABELS[name]}: {prof.get('error')}")
            continue
        print(f"--- cProfile: {LABELS[name]} ({prof['file']}), own time share, cumulative share, calls")
        for own, cum, calls, where in prof["own"]:
            print(f"    {own:6.1%} {cum:6.1%} {calls:>9}  {where}")
    if res.get("profiles"):
        print("  (a --profile run: cProfile slows the servers, its figures are not for comparison)")
    for name, prof in res.get("py_spy", {}).items():
        print_profile(LABELS[name], prof)
    if res.get("py_spy"):
        print("  (a --py-spy run: py-spy shares the load's CPU, so its figures are not for comparison)")
    print(f"total {res['elapsed_s']:.0f} s; JSON: {res['json']}")


def _commit() -> str | None:
    """``git rev-parse --short HEAD``, ``+dirty`` when the servers' packages have uncommitted (or
    untracked: tank_asgi) changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tank_core", "tank_asyncio",
                                "tank_asgi"], cwd=ROOT, capture_output=True, text=True, check=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--servers", default=",".join(DEFAULT),
                        help=f"servers to run (default {','.join(DEFAULT)}; also: "
                             f"{','.join(n for n in NAMES if n not in DEFAULT)})")
    parser.add_argument("--windows", default="16,1",
                        help="publishes in flight, one pass each (default 16,1; 1 = lockstep)")
    parser.add_argument("--seconds", type=float, default=None, help="publishing time per round")
    parser.add_argument("--reps", type=int, default=None, help="rounds per server and window")
    parser.add_argument("--profile", action="store_true",
                        help="run every server under cProfile and print where the time goes")
    parser.add_argument("--py-spy", action="store_true",
                        help="sample every server with py-spy (on PATH or in the venv); collapsed stacks "
                             "next to the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.loadgen:
        return run_load(load_fanout, opts.spec)
    opts.servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = set(opts.servers) - set(NAMES)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    opts.windows = [int(w) for w in opts.windows.split(",") if w.strip()]
    if not opts.windows or min(opts.windows) < 1:
        parser.error("--windows wants positive integers")
    opts.subscribers = 1000
    reps, seconds, opts.warmup = (3, 0.7, 0.3) if opts.quick else (5, 1.5, 0.5)
    opts.reps = opts.reps or reps
    opts.seconds = opts.seconds or seconds
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
            "commit": _commit(),
            **{name: _version(name) for name in ("uvicorn", "uvloop", "websockets", "fastapi", "starlette",
                                                 "anyio", "python-socketio", "python-engineio", "h11")},
        },
        "quick": opts.quick,
        "profiled": opts.profile or opts.py_spy,
        "servers": {name: command(name, None)[1:] for name in opts.servers},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start = time.perf_counter()
    bench_fanout(opts, res)
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
