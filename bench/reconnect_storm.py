#!/usr/bin/env python3
"""A server restart under 1,000 connected clients: all reconnect and resubscribe, none twice.

Each scenario: one ``python -m tank_cli serve --backend B`` subprocess on a fixed free port of
127.0.0.1, and 1,000 clients in this process, all ``tank_asyncio.connect`` under ``asyncio.run`` (the
default loop) or all ``tank_trio.connect`` under ``trio.run``. Every client has its own user id and
holds 1 to 3 of 10 topics (seeded). Then:

1. every client is open and ``/api/stats`` counts exactly the expected subscribers per topic;
   one ``POST /api/publish`` per topic reaches each subscriber exactly once (and no one else);
2. the server gets SIGTERM (its clients get Close 1001); once it has exited (and, for the slow
   restart, ``--down`` more seconds), a new server of the same backend starts on the same port.
   The clients back off meanwhile (defaults: full jitter, first bound 0.5 s, doubling);
3. for each client: the time from the new server's readiness line (``tank: serving ...``, time-stamped
   by a thread reading its stdout) to its ``on_reconnect(attempt)`` callback, and the attempt;
4. no duplicate ``sub:``: on the new server ``/api/stats`` must show 1,000 connections, topic counts
   equal to the held topics, ``connections_total`` = 1,000 and ``messages_in`` = the number of held
   topics exactly (the clients send nothing else: their heartbeat interval is 60 s, longer than a
   scenario, so no ``{"type":"heartbeat"}`` is counted); every client got exactly one
   ``on_reconnect``;
5. one publish per topic again reaches each subscriber exactly once, and the first round's messages
   were not delivered again.

Also reported: each client's Close 1001 time from SIGTERM, the delay before each attempt (from the
connection ends the client saw) against its full-jitter bound, and this process's event-loop lag
(a 5 ms sleep's lateness), which the reconnect spread includes: 1,000 clients share one process.

Usage: ``python bench/reconnect_storm.py [--clients 1000] [--down 3] [--only asyncio,trio]
[--servers asyncio,trio] [--out PATH]``.
Results go to ``bench/results/reconnect_storm.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "reconnect_storm.json"
PYTHON = sys.executable
HOST = "127.0.0.1"
TOPICS = tuple(f"t{i}" for i in range(10))
SEED = 4
#: Longer than a scenario: no client heartbeat reaches ``messages_in`` (the Pings still flow).
CLIENT_HEARTBEAT_INTERVAL = 60.0
#: Whole run budget, seconds: a scenario is skipped when fewer than SCENARIO_RESERVE remain.
BUDGET = 170.0
SCENARIO_RESERVE = 25.0
LAG_STEP = 0.005


def log(text: str) -> None:
    print(f"[reconnect_storm] {text}", file=sys.stderr, flush=True)


def raise_fd_limit(want: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def spread(values: list[float]) -> dict[str, float | int | None]:
    """min / p50 / p90 / p99 / max (nearest rank) of ``values``, seconds."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {"n": len(s), "min": s[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1]}


# --------------------------------------------------------------------------- the server process


class Server:
    """One ``tank serve`` subprocess; two threads time-stamp its readiness line and its exit."""

    def __init__(self, backend: str, port: int) -> None:
        self.backend = backend
        self.port = port
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; read on failure)
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tank_cli", "serve", "--host", HOST, "--port", str(port), "--backend",
             backend, "--log-level", "warning"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr,
        )
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.t_ready: float | None = None
        self.t_sigterm: float | None = None
        self.t_exit: float | None = None
        self.returncode: int | None = None
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if self.t_ready is None and raw.startswith(b"tank: serving "):
                self.t_ready = time.perf_counter()
                self.url = raw.split()[2].decode()
                self.ready.set()

    def _wait(self) -> None:
        self.returncode = self.proc.wait()  # blocking waitpid: no polling delay in t_exit
        self.t_exit = time.perf_counter()
        self.exited.set()
        self.ready.set()  # a server that died before its line wakes the waiter too

    def wait_ready(self, timeout: float) -> bool:
        self.ready.wait(timeout)
        return self.t_ready is not None

    def terminate(self) -> None:
        self.t_sigterm = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> bool:
        if self.exited.wait(timeout):
            return True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.exited.wait(5)
        return False

    def stop(self, timeout: float = 10.0) -> bool:
        if self.exited.is_set():
            return True
        self.terminate()
        return self.wait_exit(timeout)

    def stderr_tail(self, limit: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:]


def http_json(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {method} {path}: {text[:200]}")
        return json.loads(text)
    finally:
        conn.close()


def get_stats(port: int) -> dict[str, Any]:
    stats: dict[str, Any] = http_json(port, "GET", "/api/stats")
    stats.pop("rtt", None)  # one entry per connection: not worth keeping
    return stats


def publish_all(port: int, tag: str) -> dict[str, int]:
    """One publish per topic, data ``TAG:TOPIC``; the ``delivered`` of each."""
    return {topic: int(http_json(port, "POST", "/api/publish", {"topic": topic, "data": f"{tag}:{topic}"})
                       ["delivered"]) for topic in TOPICS}


# --------------------------------------------------------------------------- one client's record


class Rec:
    """What one client saw: callbacks time-stamped with ``time.perf_counter`` (the monotonic clock,
    the same as the readiness thread's)."""

    __slots__ = ("closes", "error", "got", "opened", "other", "reconnects", "topics")

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics
        self.got: Counter[tuple[str, str]] = Counter()
        self.reconnects: list[tuple[float, int]] = []
        self.closes: list[tuple[float, int, str]] = []
        self.other: Counter[str] = Counter()
        self.opened = False
        self.error: str | None = None

    def on_reconnect(self, attempt: int) -> None:
        self.reconnects.append((time.perf_counter(), attempt))

    def on_close(self, code: int, reason: str) -> None:
        self.closes.append((time.perf_counter(), code, reason))

    def on_topic(self, data: Any, message: Any) -> None:
        self.got[(message.topic, data)] += 1

    def on_message(self, message: Any) -> None:
        if message.topic is None:
            self.other[message.text[:60]] += 1


def expected_counts(recs: list[Rec]) -> dict[str, int]:
    counts = dict.fromkeys(TOPICS, 0)
    for rec in recs:
        for topic in rec.topics:
            counts[topic] += 1
    return counts


def delivery_check(recs: list[Rec], tag: str) -> dict[str, int]:
    """Per client and topic, how often ``TAG:TOPIC`` arrived: subscribers must have it once."""
    once = missing = twice_or_more = stray = 0
    for rec in recs:
        for topic in TOPICS:
            n = rec.got.get((topic, f"{tag}:{topic}"), 0)
            if topic in rec.topics:
                once += n == 1
                missing += n == 0
                twice_or_more += n > 1
            else:
                stray += n
    return {"exactly_once": once, "missing": missing, "duplicated": twice_or_more, "stray": stray}


def delivered_all(recs: list[Rec], tag: str) -> bool:
    return all(rec.got.get((topic, f"{tag}:{topic}"), 0) >= 1 for rec in recs for topic in rec.topics)


# --------------------------------------------------------------------------- the two runtimes


class AsyncioRuntime:
    name = "asyncio"

    def __init__(self) -> None:
        import tank_asyncio

        self.connect = tank_asyncio.connect

    sleep = staticmethod(asyncio.sleep)

    @staticmethod
    async def thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    @staticmethod
    def event() -> Any:
        return asyncio.Event()

    @staticmethod
    def group() -> Any:
        return asyncio.TaskGroup()

    @staticmethod
    def spawn(group: Any, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        group.create_task(fn(*args))

    @staticmethod
    def run(fn: Callable[[], Awaitable[Any]]) -> Any:
        return asyncio.run(fn())  # type: ignore[arg-type]


class TrioRuntime:
    name = "trio"

    def __init__(self) -> None:
        import trio

        import tank_trio

        self.trio = trio
        self.connect = tank_trio.connect
        self.sleep = trio.sleep

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.trio.to_thread.run_sync(fn, *args)

    def event(self) -> Any:
        return self.trio.Event()

    def group(self) -> Any:
        return self.trio.open_nursery()

    @staticmethod
    def spawn(group: Any, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        group.start_soon(fn, *args)

    def run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        return self.trio.run(fn)


async def wait_until(rt: Any, pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.perf_counter() + timeout
    while not pred():
        if time.perf_counter() >= end:
            return False
        await rt.sleep(step)
    return True


# --------------------------------------------------------------------------- one scenario


async def scenario(rt: Any, backend: str, down: float, n_clients: int, port: int) -> dict[str, Any]:
    rng = random.Random(f"{SEED}:{rt.name}:{backend}:{down}")
    recs = [Rec(rng.sample(TOPICS, rng.randint(1, 3))) for _ in range(n_clients)]
    expected = expected_counts(recs)
    held = sum(len(rec.topics) for rec in recs)
    res: dict[str, Any] = {"clients": rt.name, "server": backend, "down_s": down, "n_clients": n_clients,
                           "held_topics": held, "expected_per_topic": expected, "problems": []}
    problems: list[str] = res["problems"]
    servers: list[Server] = []

    first = Server(backend, port)
    servers.append(first)
    if not await rt.thread(first.wait_ready, 20):
        raise RuntimeError(f"server did not start: {first.stderr_tail()}")
    url = f"ws://{HOST}:{port}/ws"
    stop = rt.event()

    async def client(i: int, rec: Rec) -> None:
        try:
            async with rt.connect(url, user_id=f"c{i:04d}", heartbeat_interval=CLIENT_HEARTBEAT_INTERVAL,
                                  heartbeat_timeout=3 * CLIENT_HEARTBEAT_INTERVAL,
                                  on_reconnect=rec.on_reconnect, on_close=rec.on_close,
                                  on_message=rec.on_message) as c:
                for topic in rec.topics:
                    await c.subscribe(topic, rec.on_topic)
                rec.opened = True
                await stop.wait()
        except Exception as exc:  # recorded and reported: one client's failure must not end the run
            rec.error = f"{type(exc).__name__}: {exc}"

    lags: list[tuple[float, float]] = []
    res["_lags"] = lags

    async def monitor() -> None:
        # the client process's event-loop lag: how late a 5 ms sleep wakes up
        while not stopping:
            t = time.perf_counter()
            await rt.sleep(LAG_STEP)
            lags.append((t, time.perf_counter() - t - LAG_STEP))

    stopping = False
    try:
        async with rt.group() as group:
            rt.spawn(group, monitor)
            t0 = time.perf_counter()
            for i, rec in enumerate(recs):
                rt.spawn(group, client, i, rec)
                if i % 100 == 99:
                    await rt.sleep(0.02)  # a ramp, not a storm: the storm is the restart
            try:
                await drive(rt, res, recs, servers, port, down, t0)
            finally:
                stopping = True
                stop.set()
                t_leave = time.perf_counter()
        res["close_all_s"] = time.perf_counter() - t_leave
    finally:
        for server in servers:
            if not await rt.thread(server.stop, 10):
                problems.append(f"server {server.proc.pid} did not exit on SIGTERM within 10 s")
    errors = Counter(rec.error for rec in recs if rec.error)
    if errors:
        problems.append(f"client errors: {dict(errors)}")
    res["client_errors"] = dict(errors)
    del res["_lags"]
    return res


def lag_summary(lags: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Loop lag of the client process for the sleeps begun in [start, end]: the worst lateness, and
    the sum of the latenesses over 10 ms (time the loop was visibly stalled)."""
    window = [lag for t, lag in lags if start <= t <= end]
    return {"max_s": max(window, default=0.0), "stalled_s": sum(lag for lag in window if lag > 0.01),
            "window_s": end - start}


async def drive(rt: Any, res: dict[str, Any], recs: list[Rec], servers: list[Server], port: int,
                down: float, t0: float) -> None:
    problems: list[str] = res["problems"]
    expected: dict[str, int] = res["expected_per_topic"]
    n = len(recs)

    # 1. everyone open and subscribed; a publish per topic reaches each subscriber once
    ok = await wait_until(rt, lambda: all(r.opened or r.error for r in recs), 40)
    res["connect_all_s"] = time.perf_counter() - t0
    opened = sum(r.opened for r in recs)
    res["opened"] = opened
    if not ok or opened != n:
        problems.append(f"only {opened}/{n} clients opened")
        return

    async def topics_match() -> dict[str, Any]:
        stats: dict[str, Any] = {}
        end = time.perf_counter() + 10
        while time.perf_counter() < end:
            stats = await rt.thread(get_stats, port)
            if {t: stats["topics"].get(t, 0) for t in TOPICS} == expected and stats["connections"] == n:
                break
            await rt.sleep(0.05)
        return stats

    stats = await topics_match()
    res["stats_before"] = stats
    delivered = await rt.thread(publish_all, port, "before")
    res["delivered_before"] = delivered
    if delivered != expected:
        problems.append(f"before the restart: publish delivered {delivered}, expected {expected}")
    await wait_until(rt, lambda: delivered_all(recs, "before"), 10)
    await rt.sleep(0.3)  # room for a duplicate to show
    res["check_before"] = delivery_check(recs, "before")

    # 2. restart: SIGTERM, exit, (down), a new server on the same port
    marks = [(len(r.reconnects), len(r.closes)) for r in recs]
    old = servers[0]
    cpu_sigterm = time.process_time()
    old.terminate()
    if not await rt.thread(old.wait_exit, 15):
        problems.append("the old server did not exit within 15 s of SIGTERM (killed)")
    assert old.t_sigterm is not None and old.t_exit is not None
    res["old_exit_code"] = old.returncode
    res["shutdown_s"] = old.t_exit - old.t_sigterm
    if down:
        await rt.sleep(down)
    new = Server(old.backend, port)
    servers.append(new)
    if not await rt.thread(new.wait_ready, 20):
        problems.append(f"the new server did not start: {new.stderr_tail()}")
        return
    assert new.t_ready is not None
    res["startup_s"] = new.t_ready - new.t_spawn
    res["outage_s"] = new.t_ready - old.t_sigterm  # SIGTERM to the new readiness line
    res["down_gap_s"] = new.t_spawn - old.t_exit

    # 3. everyone back
    back = await wait_until(
        rt, lambda: all(len(r.reconnects) > m[0] for r, m in zip(recs, marks, strict=True)), 45)
    t_back = time.perf_counter()
    res["client_cpu_restart_s"] = time.process_time() - cpu_sigterm  # SIGTERM to all back
    res["all_back_after_ready_s"] = t_back - new.t_ready
    res["loop_lag_restart"] = lag_summary(res["_lags"], old.t_sigterm, t_back)
    res["loop_lag_outage"] = lag_summary(res["_lags"], old.t_sigterm, new.t_ready)
    res["loop_lag_steady"] = lag_summary(res["_lags"], t0 + res["connect_all_s"], old.t_sigterm)
    await rt.sleep(0.5)  # room for a second open or a late duplicate sub: to show
    after = [(r.reconnects[m[0]:], r.closes[m[1]:]) for r, m in zip(recs, marks, strict=True)]
    reconnected = sum(1 for rc, _ in after if rc)
    twice = sum(1 for rc, _ in after if len(rc) > 1)
    res["reconnected"] = reconnected
    res["reconnected_twice"] = twice
    if not back or reconnected != n:
        problems.append(f"only {reconnected}/{n} clients reconnected within 45 s of the readiness line")
    if twice:
        problems.append(f"{twice} clients reconnected more than once")
    firsts = [rc[0] for rc, _ in after if rc]
    res["from_ready_s"] = spread([t - new.t_ready for t, _ in firsts])
    res["from_sigterm_s"] = spread([t - old.t_sigterm for t, _ in firsts])
    res["from_old_exit_s"] = spread([t - old.t_exit for t, _ in firsts])
    res["before_ready"] = sum(1 for t, _ in firsts if t < new.t_ready)
    res["attempts"] = {str(k): v for k, v in sorted(Counter(a for _, a in firsts).items())}
    # the connection ends each client saw during the outage: one 1001, then attempt - 1 failures
    codes = Counter()
    reasons: Counter[str] = Counter()
    inconsistent = 0
    for rc, closes in after:
        codes.update(code for _, code, _ in closes)
        reasons.update(reason.split(":")[0] for _, code, reason in closes if code != 1001)
        if rc and len(closes) != rc[0][1]:  # 1 close from the server + (attempt - 1) failed attempts
            inconsistent += 1
    res["close_codes"] = {str(k): v for k, v in sorted(codes.items())}
    # Backoff as seen from outside: the delay before attempt k is the time from the previous end
    # (the 1001, then each refusal, which comes within a millisecond of the attempt) to the next
    # end, or to on_reconnect for the last attempt (so that one also holds the handshake and the
    # sub: writes). Full jitter: uniform in [0, 0.5 * 2 ** (k - 1)], median half the bound.
    gaps: dict[int, list[float]] = {}
    for rc, closes in after:
        if rc and len(closes) == rc[0][1]:
            ends = [t for t, _, _ in closes] + [rc[0][0]]
            for k in range(1, len(ends)):
                gaps.setdefault(k, []).append(ends[k] - ends[k - 1])
    res["delay_before_attempt_s"] = {
        str(k): {**spread(v), "bound": min(30.0, 0.5 * 2 ** (k - 1))} for k, v in sorted(gaps.items())}
    res["close_1001_from_sigterm_s"] = spread(
        [t - old.t_sigterm for _, closes in after for t, code, _ in closes if code == 1001])
    res["failed_attempt_reasons"] = dict(reasons)
    res["closes_not_matching_attempts"] = inconsistent
    if codes.get(1001, 0) != n:
        problems.append(f"{codes.get(1001, 0)}/{n} clients got Close 1001 from the old server")
    res["raw"] = {"from_ready_s": [round(t - new.t_ready, 6) for t, _ in firsts],
                  "attempt": [a for _, a in firsts]}

    # 4. exactly one sub: per held topic on the new server
    stats = await topics_match()
    res["stats_after"] = stats
    topic_counts = {t: stats["topics"].get(t, 0) for t in TOPICS}
    res["duplicate_subs"] = stats["messages_in"] - res["held_topics"]
    if topic_counts != expected:
        problems.append(f"after the restart: topic counts {topic_counts}, expected {expected}")
    if stats["messages_in"] != res["held_topics"]:
        problems.append(f"after the restart: messages_in {stats['messages_in']}, held topics "
                        f"{res['held_topics']}")
    if stats["connections"] != n or stats["connections_total"] != n:
        problems.append(f"after the restart: connections {stats['connections']}, connections_total "
                        f"{stats['connections_total']}, expected {n}")

    # 5. a publish per topic reaches each subscriber once; the first round is not replayed
    delivered = await rt.thread(publish_all, port, "after")
    res["delivered_after"] = delivered
    if delivered != expected:
        problems.append(f"after the restart: publish delivered {delivered}, expected {expected}")
    await wait_until(rt, lambda: delivered_all(recs, "after"), 10)
    await rt.sleep(0.3)
    res["check_after"] = delivery_check(recs, "after")
    res["check_before_again"] = delivery_check(recs, "before")
    for key in ("check_before", "check_after", "check_before_again"):
        c = res[key]
        if c["exactly_once"] != res["held_topics"] or c["missing"] or c["duplicated"] or c["stray"]:
            problems.append(f"{key}: {c}")
    res["other_messages"] = dict(sum((r.other for r in recs), Counter()))


# --------------------------------------------------------------------------- main


def run_one(runtime: str, backend: str, down: float, n_clients: int) -> dict[str, Any]:
    rt: Any = AsyncioRuntime() if runtime == "asyncio" else TrioRuntime()
    port = free_port()
    log(f"{runtime} clients x {n_clients}, server --backend {backend}, port {port}, "
        f"{'restart at once' if not down else f'server down {down:g} s'}")
    t = time.perf_counter()
    res: dict[str, Any] = rt.run(lambda: scenario(rt, backend, down, n_clients, port))
    res["elapsed_s"] = time.perf_counter() - t
    res["port"] = port
    gc.collect()
    return res


def fmt_spread(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return " / ".join(f"{s[k]:.3f}" for k in ("min", "p50", "p90", "p99", "max"))


def print_table(res: dict[str, Any]) -> None:
    print(f"reconnect storm: {res['n_clients']} clients, 10 topics, 1-3 each; restart = SIGTERM, exit, "
          f"new server on the same port; times in s")
    for r in res["scenarios"]:
        name = f"{r['clients']} clients / {r['server']} server / " + (
            "restart at once" if not r["down_s"] else f"down {r['down_s']:g} s")
        verdict = "PASS" if not r["problems"] else "FAIL"
        print(f"\n== {name}: {verdict} ({r.get('elapsed_s', 0):.1f} s)")
        if "reconnected" not in r:
            print(f"  incomplete: {r['problems']}")
            continue
        print(f"  connect {r['n_clients']}: {r['connect_all_s']:.2f} s; shutdown (SIGTERM to exit) "
              f"{r['shutdown_s']:.3f} s; gap exit to spawn {r['down_gap_s']:.3f} s; new server start "
              f"(spawn to ready line) {r['startup_s']:.3f} s; outage (SIGTERM to ready) "
              f"{r['outage_s']:.3f} s")
        print(f"  reconnected {r['reconnected']}/{r['n_clients']}, more than once {r['reconnected_twice']}; "
              f"duplicate subs {r['duplicate_subs']} (messages_in {r['stats_after']['messages_in']} vs "
              f"held topics {r['held_topics']}; connections_total {r['stats_after']['connections_total']})")
        print(f"  reconnect time from ready line  min/p50/p90/p99/max: {fmt_spread(r['from_ready_s'])}"
              f"  ({r['before_ready']} before the line)")
        print(f"  reconnect time from SIGTERM     min/p50/p90/p99/max: {fmt_spread(r['from_sigterm_s'])}")
        print(f"  Close 1001 from SIGTERM         min/p50/p90/p99/max: "
              f"{fmt_spread(r['close_1001_from_sigterm_s'])}")
        lr, lo = r["loop_lag_restart"], r["loop_lag_outage"]
        print(f"  client loop lag (5 ms sleeps): SIGTERM to ready line max {lo['max_s'] * 1000:.0f} ms, "
              f"stalled {lo['stalled_s']:.2f} of {lo['window_s']:.2f} s; SIGTERM to all back max "
              f"{lr['max_s'] * 1000:.0f} ms, stalled {lr['stalled_s']:.2f} s; before SIGTERM max "
              f"{r['loop_lag_steady']['max_s'] * 1000:.0f} ms; client process CPU SIGTERM to all back "
              f"{r['client_cpu_restart_s']:.2f} s ({r['client_cpu_restart_s'] / r['n_clients'] * 1e3:.2f} ms "
              "per client)")
        print(f"  attempts: {', '.join(f'{k}: {v}' for k, v in r['attempts'].items())}; failed attempts "
              f"by reason {r['failed_attempt_reasons'] or '{}'}; closes != attempts: "
              f"{r['closes_not_matching_attempts']}")
        print("  delay before attempt k (previous end to this end), p50 / max vs full-jitter bound: "
              + "; ".join(f"{k}: {g['p50']:.2f}/{g['max']:.2f} (<= {g['bound']:g}, n {g['n']})"
                          for k, g in r["delay_before_attempt_s"].items()))
        for key, label in (("check_before", "publish before"), ("check_after", "publish after"),
                           ("check_before_again", "before, again")):
            c = r[key]
            print(f"  {label}: {c['exactly_once']}/{r['held_topics']} exactly once, missing {c['missing']}, "
                  f"duplicated {c['duplicated']}, stray {c['stray']}")
        print(f"  all closed at the end in {r.get('close_all_s', float('nan')):.2f} s")
        for p in r["problems"]:
            print(f"  PROBLEM: {p}")
    print(f"\ntotal {res['elapsed_s']:.0f} s; JSON: {res['json']}")


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tank_core", "tank_asyncio", "tank_cli",
                                "tank_trio"], cwd=ROOT, capture_output=True, text=True, check=True,
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
    parser.add_argument("--clients", type=int, default=1000, help="clients per scenario (default 1000)")
    parser.add_argument("--down", type=float, default=3.0,
                        help="seconds the server stays down in the slow restart (default 3; 0: skip it)")
    parser.add_argument("--only", default="asyncio,trio", help="client libraries to run: asyncio,trio")
    parser.add_argument("--servers", default="asyncio,trio", help="server backends: asyncio,trio")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    opts = parser.parse_args(argv)
    runtimes = [s.strip() for s in opts.only.split(",") if s.strip()]
    backends = [s.strip() for s in opts.servers.split(",") if s.strip()]
    if set(runtimes) - {"asyncio", "trio"} or set(backends) - {"asyncio", "trio"} or opts.clients < 1:
        parser.error("--only and --servers take asyncio,trio; --clients >= 1")
    fd_limit = raise_fd_limit()
    plan = [(rt, backend, 0.0) for rt in runtimes for backend in backends]
    if opts.down > 0:  # the slow restart: once per client library, on its own backend if available
        plan += [(rt, rt if rt in backends else backends[0], opts.down) for rt in runtimes]
    res: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "fd_limit": fd_limit,
            "loadavg_at_start": os.getloadavg(),
            "commit": _git_commit(),
            **{name: _version(name) for name in ("trio", "uvloop", "wsproto", "h11")},
        },
        "n_clients": opts.clients,
        "client_settings": {"heartbeat_interval": CLIENT_HEARTBEAT_INTERVAL,
                            "heartbeat_timeout": 3 * CLIENT_HEARTBEAT_INTERVAL,
                            "reconnect_initial_delay": 0.5, "reconnect_max_delay": 30.0},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenarios": [],
        "skipped": [],
    }
    start = time.perf_counter()
    for runtime, backend, down in plan:
        left = BUDGET - (time.perf_counter() - start)
        if left < SCENARIO_RESERVE + down:
            log(f"skipped {runtime}/{backend}/down {down:g}: {left:.0f} s of the budget left")
            res["skipped"].append({"clients": runtime, "server": backend, "down_s": down})
            continue
        try:
            scen = run_one(runtime, backend, down, opts.clients)
        except Exception as exc:
            scen = {"clients": runtime, "server": backend, "down_s": down, "n_clients": opts.clients,
                    "problems": [f"crashed: {type(exc).__name__}: {exc}"]}
        log(f"  {'ok' if not scen['problems'] else 'PROBLEMS: ' + '; '.join(scen['problems'])}")
        res["scenarios"].append(scen)
    res["environment"]["loadavg_at_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    res["json"] = str(opts.out)
    opts.out.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    return 1 if any(s["problems"] for s in res["scenarios"]) else 0


if __name__ == "__main__":
    sys.exit(main())
