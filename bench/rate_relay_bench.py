#!/usr/bin/env python3
"""Latency at a fixed rate and relay cost: our servers against picows, over real sockets, same run.

Issue 9's two remaining targets, with ``server_bench.py``'s servers, pinning and raw load clients:

(rate) a fixed 10,000 deliveries/s: 10 publishes/s (``pub:bench:<100 bytes>``) to 1,000 subscribers,
    for ``--seconds`` per round. Publish-to-receive latency of every delivery (from the publisher's
    ``write`` to the subscriber's read of the whole frame, both in the load process), p50/p99/max,
    and the server's CPU % over the round. Servers: ``bench/peers/tank_embedded.py`` (asyncio on
    uvloop, trio) and ``bench/peers/picows_server.py``, all running at once, rounds rotated.
(relay) one connection sends 100-byte texts, which the server relays to the one other connection,
    with at most 64 in flight: server CPU (utime+stime) per message. Ours is the real command line,
    ``python -m tank_cli serve`` (relay is on by default; the heartbeat is pushed out to 1,000 s);
    picows is ``bench/peers/picows_server.py --relay``.

Usage: ``python bench/rate_relay_bench.py [--quick] [--only rate,relay] [--servers a,b]``. Results
also go to ``bench/results/rate_relay_bench.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_bench import (  # a sibling script, not a package
    LOAD_CPU,
    PEERS,
    PYTHON,
    SERVER_CPU,
    Client,
    Group,
    ServerProcess,
    _git_commit,
    abort_all,
    client_frame,
    delivery_frame,
    fanout_command,
    log,
    open_clients,
    proc_times,
    proc_wait,
    pub_frame,
    raise_fd_limit,
    run_load,
    summary,
)
from server_bench import run_loadgen as server_bench_loadgen  # a sibling script

RESULTS = Path(__file__).resolve().parent / "results" / "rate_relay_bench.json"
NAMES = ("picows", "tank-asyncio", "tank-trio")
#: Where the 12-digit sequence number sits in a delivery frame.
SEQ_AT = delivery_frame(0).index(b"seq ") + 4
#: The relayed message: 100 bytes of text (not a command), 102 bytes once framed by the server.
MESSAGE = "chat: hello everyone, this is an application message for the relay path ".ljust(100, ".").encode()
RELAY_FRAME = client_frame(MESSAGE)


def relay_command(name: str) -> list[str]:
    if name.startswith("tank-"):
        return [PYTHON, "-m", "tank_cli", "serve", "--port", "0", "--backend", name.removeprefix("tank-"),
                "--heartbeat-interval", "1000", "--heartbeat-timeout", "3000",
                # picows has no rate limits: ours are off, so both do the same work.
                "--max-frames-per-second", "off", "--max-input-bytes-per-second", "off"]
    return [PYTHON, str(PEERS / f"{name}_server.py"), "--relay"]


# --------------------------------------------------------------------------- load: fixed rate


class TimingClient(Client):
    """A subscriber that reads the sequence number of every frame and records its latency."""

    rest = b""

    def data_received(self, data: bytes) -> None:
        if not self.counting:
            super().data_received(data)
            return
        now = time.perf_counter()
        group = self.group
        size = group.frame_size
        self.nbytes += len(data)
        group.total += len(data)
        buf = self.rest + data if self.rest else data
        sent_at = group.sent_at  # type: ignore[attr-defined]
        latencies = group.latencies  # type: ignore[attr-defined]
        end = len(buf) - len(buf) % size
        for at in range(0, end, size):
            t = sent_at.get(int(buf[at + SEQ_AT:at + SEQ_AT + 12]))
            if t is not None:
                latencies.append(now - t)
        self.rest = buf[end:]


async def load_rate(spec: dict[str, Any]) -> dict[str, Any]:
    frame_size = len(delivery_frame(0))
    subs = spec["subscribers"]
    groups = [Group(s["name"], s["url"], s["pid"], frame_size) for s in spec["servers"]]
    for group in groups:
        group.sent_at = {}  # type: ignore[attr-defined]
        group.latencies = []  # type: ignore[attr-defined]
        [group.publisher] = await open_clients(group, 1, lambda i, g=group: Client(g, "publisher"), 64)
        group.subscribers = await open_clients(
            group, subs, lambda i, g=group: TimingClient(g, f"sub{i}", subscriber=True), 64)
        t = time.perf_counter()
        while min(s.nbytes for s in group.subscribers) < frame_size:  # sub: is never acknowledged
            if time.perf_counter() - t > 30:
                raise RuntimeError(f"{group.name}: subscriptions not effective after 30 s")
            assert group.publisher is not None and group.publisher.transport is not None
            group.publisher.transport.write(pub_frame(group.seq))
            group.seq += 1
            await asyncio.sleep(0.02)
        log(f"  {group.name}: {subs} subscribers ready")
    await asyncio.sleep(0.5)
    gc.collect()
    gc.freeze()
    gc.disable()
    period = 1.0 / spec["publishes_per_s"]

    async def one_round(group: Group) -> dict[str, Any]:
        assert group.publisher is not None and group.publisher.transport is not None
        count = round(spec["seconds"] * spec["publishes_per_s"])
        sent_at: dict[int, float] = {}
        group.sent_at = sent_at  # type: ignore[attr-defined]
        latencies: list[float] = []
        group.latencies = latencies  # type: ignore[attr-defined]
        wait0 = proc_wait(group.pid)
        user0, sys0 = proc_times(group.pid)
        t0 = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, t0 + i * period - time.perf_counter()))
            seq = group.seq
            group.seq += 1
            sent_at[seq] = time.perf_counter()
            group.publisher.transport.write(pub_frame(seq))
        await asyncio.sleep(max(0.0, t0 + count * period - time.perf_counter()))
        t1 = time.perf_counter()  # CPU over count periods: the server's share of a steady rate
        user1, sys1 = proc_times(group.pid)
        wait1 = proc_wait(group.pid)
        while len(latencies) < count * subs and time.perf_counter() - t1 < 5:
            await asyncio.sleep(0.01)
        if len(latencies) != count * subs or group.lost:
            raise RuntimeError(f"{group.name}: {len(latencies)} deliveries of {count * subs}, "
                               f"{group.lost} lost")
        latencies.sort()
        n = len(latencies)
        cpu = user1 - user0 + sys1 - sys0
        return {
            "publishes": count,
            "deliveries": n,
            "seconds": t1 - t0,
            "p50_ms": latencies[n // 2] * 1e3,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3,
            "max_ms": latencies[-1] * 1e3,
            "server_cpu_pct": cpu / (t1 - t0) * 100,
            "server_us_per_delivery": cpu / n * 1e6,
            "server_wait_pct": (wait1 - wait0) / (t1 - t0) * 100,
        }

    samples: dict[str, list[dict[str, Any]]] = {g.name: [] for g in groups}
    for rep in range(spec["reps"]):
        order = groups[rep % len(groups):] + groups[:rep % len(groups)]
        for group in order:
            sample = await one_round(group)
            samples[group.name].append(sample)
            log(f"  rate rep {rep + 1}/{spec['reps']} {group.name:<13} p50 {sample['p50_ms']:6.2f} ms  "
                f"p99 {sample['p99_ms']:6.2f} ms  max {sample['max_ms']:6.2f} ms  server CPU "
                f"{sample['server_cpu_pct']:4.1f} % (waiting {sample['server_wait_pct']:3.1f} %)")
            await asyncio.sleep(0.2)
    abort_all(groups)
    gc.enable()
    return {"frame_bytes": frame_size, "samples": samples}


# --------------------------------------------------------------------------- load: relay


class RelayGroup(Group):
    """One sender and one receiver; the sender keeps at most ``window`` messages in flight."""

    def progress(self) -> None:
        size = self.frame_size
        now = time.perf_counter()
        if self.publishing and now >= self.deadline:
            self.publishing = False
        if self.publishing:
            in_flight = self.sent - (self.total - self.base) // size
            k = self.window - in_flight
            if k > 0:
                assert self.publisher is not None and self.publisher.transport is not None
                self.publisher.transport.write(RELAY_FRAME * k)
                self.sent += k
            self.mark = self.base + (self.sent - self.window + 1) * size
            return
        target = self.base + self.sent * size
        if self.total >= target:
            self.mark = float("inf")
            if self.done is not None and not self.done.done():
                self.done.set_result((now, proc_times(self.pid)))
        else:
            self.mark = target


async def load_relay(spec: dict[str, Any]) -> dict[str, Any]:
    frame_size = len(MESSAGE) + 2
    groups = [RelayGroup(s["name"], s["url"], s["pid"], frame_size) for s in spec["servers"]]
    for group in groups:
        group.window = spec["window"]
        # The receiver subscribes to a topic nobody publishes to (harmless), then counts bytes.
        group.subscribers = await open_clients(group, 1, lambda i, g=group: Client(g, "receiver",
                                                                                    subscriber=True), 1)
        [group.publisher] = await open_clients(group, 1, lambda i, g=group: Client(g, "sender"), 1)
    await asyncio.sleep(0.3)
    gc.collect()
    gc.freeze()
    gc.disable()

    async def one_round(group: Group, seconds: float) -> dict[str, float]:
        group.base = group.total
        group.sent = 0
        group.done = asyncio.get_running_loop().create_future()
        wait0 = proc_wait(group.pid)
        user0, sys0 = proc_times(group.pid)
        t0 = time.perf_counter()
        group.deadline = t0 + seconds
        group.publishing = True
        group.progress()
        t1, (user1, sys1) = await asyncio.wait_for(group.done, seconds + 60)
        wait1 = proc_wait(group.pid)
        await asyncio.sleep(0.1)
        if group.total != group.base + group.sent * frame_size or group.lost:
            raise RuntimeError(f"{group.name}: {group.total - group.base} bytes relayed, expected "
                               f"{group.sent * frame_size}; {group.lost} lost")
        cpu = user1 - user0 + sys1 - sys0
        return {
            "messages": group.sent,
            "seconds": t1 - t0,
            "messages_per_s": group.sent / (t1 - t0),
            "server_us_per_message": cpu / group.sent * 1e6,
            "server_user_us_per_message": (user1 - user0) / group.sent * 1e6,
            "server_sys_us_per_message": (sys1 - sys0) / group.sent * 1e6,
            "server_cpu_pct": cpu / (t1 - t0) * 100,
            "server_wait_pct": (wait1 - wait0) / (t1 - t0) * 100,
        }

    for group in groups:
        await one_round(group, spec["warmup"])
    samples: dict[str, list[dict[str, float]]] = {g.name: [] for g in groups}
    for rep in range(spec["reps"]):
        order = groups[rep % len(groups):] + groups[:rep % len(groups)]
        for group in order:
            sample = await one_round(group, spec["seconds"])
            samples[group.name].append(sample)
            log(f"  relay rep {rep + 1}/{spec['reps']} {group.name:<13} {sample['messages_per_s']:>9,.0f} "
                f"msgs/s  {sample['server_us_per_message']:5.2f} us/message  server CPU "
                f"{sample['server_cpu_pct']:3.0f} % (waiting {sample['server_wait_pct']:3.0f} %)")
    abort_all(groups)
    gc.enable()
    return {"frame_bytes": frame_size, "samples": samples}


def loadgen_main(mode: str, spec_text: str) -> int:
    return run_load(load_rate if mode == "rate" else load_relay, spec_text)


# --------------------------------------------------------------------------- orchestration


def run_loadgen(mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return server_bench_loadgen(mode, spec, timeout, script=__file__)


def run_section(mode: str, opts: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    make = fanout_command if mode == "rate" else relay_command
    servers = [ServerProcess(name, make(name)) for name in opts.servers]
    try:
        spec["servers"] = [{"name": s.name, "url": s.url, "pid": s.pid} for s in servers]
        raw = run_loadgen(mode, spec, timeout=600)
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited: {server.stderr()}")
    finally:
        for server in servers:
            server.stop()
    samples: dict[str, list[dict[str, float]]] = raw["samples"]
    block: dict[str, Any] = {"spec": {k: v for k, v in spec.items() if k != "servers"}, "servers": {},
                             "ratios": {}}
    for name, rounds in samples.items():
        block["servers"][name] = {key: summary([r[key] for r in rounds]) for key in rounds[0]}
    keys = (("p50_ms", "p99_ms", "server_cpu_pct") if mode == "rate"
            else ("server_us_per_message",))
    for name in samples:
        if name == "picows" or "picows" not in samples:
            continue
        for key in keys:  # paired: the same round index, back to back
            values = [x[key] / y[key] for x, y in zip(samples[name], samples["picows"], strict=True)]
            block["ratios"][f"{name}/picows/{key}"] = summary(values)
    return block


TARGETS = {  # issue 9: (bound, what)
    "rate": {"tank-asyncio/picows/p99_ms": 1.0, "tank-trio/picows/p50_ms": 1.2,
             "tank-trio/picows/p99_ms": 1.2, "tank-trio/picows/server_cpu_pct": 1.2},
    "relay": {"tank-asyncio/picows/server_us_per_message": 1.0,
              "tank-trio/picows/server_us_per_message": 1.0},
}


def mmm(stat: dict[str, Any], digits: int = 2) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def print_table(res: dict[str, Any]) -> None:
    print(f"\nrate/relay benchmark: commit {res['commit']}, server on CPU {SERVER_CPU}, load on CPU "
          f"{LOAD_CPU}, load average {res['loadavg_at_start']} -> {res['loadavg_at_end']}")
    r = res.get("rate")
    if r:
        spec = r["spec"]
        print(f"(rate) {spec['publishes_per_s'] * spec['subscribers']:,} deliveries/s "
              f"({spec['publishes_per_s']} publishes/s to {spec['subscribers']:,} subscribers), "
              f"{spec['reps']} rounds of {spec['seconds']:g} s each; median [min-max] over rounds")
        print(f"  {'':<14}{'p50 ms':>22}{'p99 ms':>22}{'max ms':>22}{'server CPU %':>22}{'us/delivery':>22}")
        for name, s in r["servers"].items():
            print(f"  {name:<14}{mmm(s['p50_ms']):>22}{mmm(s['p99_ms']):>22}{mmm(s['max_ms']):>22}"
                  f"{mmm(s['server_cpu_pct'], 1):>22}{mmm(s['server_us_per_delivery']):>22}")
    x = res.get("relay")
    if x:
        spec = x["spec"]
        print(f"(relay) 100-byte texts relayed to one other connection, {spec['window']} in flight, "
              f"{spec['reps']} rounds of {spec['seconds']:g} s each")
        print(f"  {'':<14}{'us/message':>22}{'user':>8}{'sys':>8}{'msgs/s':>30}{'waiting %':>11}")
        for name, s in x["servers"].items():
            rate = s["messages_per_s"]
            print(f"  {name:<14}{mmm(s['server_us_per_message']):>22}"
                  f"{s['server_user_us_per_message']['median']:>8.2f}"
                  f"{s['server_sys_us_per_message']['median']:>8.2f}"
                  f"{rate['median']:>12,.0f} [{rate['min']:,.0f}-{rate['max']:,.0f}]"
                  f"{s['server_wait_pct']['median']:>11.1f}")
    for section in ("rate", "relay"):
        if section not in res:
            continue
        print(f"  ratios ({section}; median of per-round ratios [min-max]):")
        for key, stat in res[section]["ratios"].items():
            bound = TARGETS[section].get(key)
            note = f"target <= {bound:g}: {'PASS' if stat['median'] <= bound else 'FAIL'}" if bound else ""
            print(f"    {key:<42}{mmm(stat):>22}  {note}")
    print(f"total {res['elapsed_s']:.0f} s; JSON: {res['json']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--only", default="rate,relay", help="sections to run: rate,relay")
    parser.add_argument("--servers", default=",".join(NAMES), help=f"default {','.join(NAMES)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--loadgen", choices=("rate", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.loadgen:
        return loadgen_main(opts.loadgen, opts.spec)
    opts.servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    if set(opts.servers) - set(NAMES):
        parser.error(f"servers: {', '.join(NAMES)}")
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    os.sched_setaffinity(0, {LOAD_CPU})
    raise_fd_limit()
    res: dict[str, Any] = {"commit": _git_commit(), "quick": opts.quick, "loadavg_at_start": os.getloadavg(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    if "rate" in only:
        log(f"(rate) starting {', '.join(opts.servers)}")
        res["rate"] = run_section("rate", opts, {
            "subscribers": 1000, "publishes_per_s": 10,
            "reps": 2 if opts.quick else 3, "seconds": 2.0 if opts.quick else 4.0})
    if "relay" in only:
        log(f"(relay) starting {', '.join(opts.servers)}")
        res["relay"] = run_section("relay", opts, {
            "window": 64, "reps": 2 if opts.quick else 5, "seconds": 1.0 if opts.quick else 2.0,
            "warmup": 0.3 if opts.quick else 0.5})
    res["loadavg_at_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    res["json"] = str(opts.out)
    opts.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
