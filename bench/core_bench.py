#!/usr/bin/env python3
"""Benchmark of the sans-IO core (``tank_core``): pure Python, no sockets, no event loop.

Measures, per second, with a peer measured in the same run (the machine is noisy: read the ratios):

(a) publish to 1,000 subscribers, in deliveries/s: ``TankServer.publish`` plus the adapter work the
    core's pull API makes unavoidable per delivery (``server.take_ready()``, then
    ``server.data_to_send(conn_id)`` for each recipient: the bytes to write). Peer: wsproto alone
    framing the message once per subscriber (``conn.send(Message(...))`` on 1,000 server-side
    ``wsproto.connection.Connection`` objects). Target: (a)/peer >= 5x.
(b) ``tick`` over 10,000 idle connections at their ping time (10,000 Pings + 10,000 text
    heartbeats), in connections/s and microseconds per connection (taking the bytes is timed
    apart); and the memory the core holds
    per idle connection after the handshake (tracemalloc).
(c) receiving 100-byte messages (masked client frames) through ``server.receive(BytesReceived)``,
    1 and 32 frames per read: relay off (receive + classify), relay on with 1 other client, and
    ``sub:``/``unsub:`` churn. Peer: wsproto alone receiving the same bytes.

Method: ``time.perf_counter``; each measured function is calibrated to a fixed sample duration (the
calibration runs double as warm-up); core and peer samples alternate so noise hits both; the median
of the samples is reported with its min/max, and ratios are medians of per-repetition ratios.
``gc.collect()`` runs between sections; the collector stays enabled while timing (as in a server).

Usage: ``python bench/core_bench.py [--quick] [--profile a,b,c] [--out PATH]``.
Results are also written as JSON to ``bench/results/core_bench.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from tank_core import ServerConfig, TankServer
from tank_core.events import BytesReceived
from tank_core.notifications import MessageReceived, TopicSubscribed, TopicUnsubscribed
from tank_core.wire.codec import render_topic_message

RESULTS = Path(__file__).resolve().parent / "results" / "core_bench.json"

T0 = 10_000.0  # the fake monotonic clock (exact in binary, so T0 + k * interval is exact)
WALL0 = 1_767_225_600.0
TOPIC = "bench"
#: 100 bytes of publish data (no <, > or &: the common case that needs no Go-style escaping).
DATA = "price update: EURUSD bid 1.08342 ask 1.08351 vol 2500000 venue LDN seq 000123456 ".ljust(100, "~")
#: A 100-byte relay-free client message (not JSON, not sub:/unsub:).
MESSAGE = "chat: hello everyone, this is an application message for the receive path ".ljust(100, ".")

Runner = Callable[[int], float]  # run(n) -> elapsed seconds for n units of work


def wall(now: float) -> float:
    return WALL0 + (now - T0)


# --------------------------------------------------------------------------- measurement


def calibrate(run: Runner, target: float, cap: int) -> int:
    """The n for which run(n) takes about ``target`` seconds (the runs are the warm-up)."""
    n = 1
    while True:
        elapsed = run(n)
        if elapsed >= target / 8 or n >= cap:
            break
        n = min(cap, n * 4)
    n = max(1, min(cap, round(n * target / max(elapsed, 1e-9))))
    run(n)  # one warm-up at the final size
    return n


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": values,
    }


def paired(runs: dict[str, tuple[Runner, int, float]], reps: int) -> dict[str, list[float]]:
    """Alternate the runs (rotating which goes first) ``reps`` times; rates per run, per rep.

    ``runs`` maps a name to (run, n, units per n); the rate of a sample is n * units / elapsed.
    """
    names = list(runs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            run, n, units = runs[name]
            rates[name].append(n * units / run(n))
    return rates


def ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def profile(label: str, fn: Callable[[], object], top: int = 18) -> str:
    """Run ``fn`` under cProfile; print the top functions by own time and each package's share."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stream = _Capture()
    stats = pstats.Stats(prof, stream=stream)  # type: ignore[arg-type]
    shares: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, _func), (_cc, _nc, own, *_rest) in raw.items():
        package = _package(filename)
        shares[package] = shares.get(package, 0.0) + own
    total = sum(shares.values()) or 1.0
    share_text = ", ".join(f"{name} {t / total:.0%}" for name, t in
                           sorted(shares.items(), key=lambda kv: -kv[1]) if t / total >= 0.005)
    stats.sort_stats("tottime").print_stats(top)
    text = (f"--- cProfile: {label} ---\nown time by package: {share_text}\n"
            + stream.text())
    print(text)
    return text


def _package(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/tank_core/" in filename:
        return "tank_core/" + filename.rsplit("/", 1)[1]
    if filename == __file__ or filename.endswith("core_bench.py"):
        return "bench (adapter loop)"
    return "stdlib"


class _Capture:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def text(self) -> str:
        lines = "".join(self.parts).splitlines()
        # Drop pstats' preamble up to the column header.
        for i, line in enumerate(lines):
            if line.lstrip().startswith("ncalls"):
                lines = lines[i:]
                break
        return "\n".join(line.replace(str(Path.cwd()) + "/", "") for line in lines if line.strip())


# --------------------------------------------------------------------------- driving the core


def take_all(server: TankServer) -> dict[int, bytes]:
    """Take every ready connection's bytes, as an adapter does when its sockets can be written
    (the bytes count as sent once taken). Returns what each connection got (None, a close, is
    left out)."""
    taken: dict[int, bytes] = {}
    data_to_send = server.data_to_send
    for conn_id in server.take_ready():
        data = data_to_send(conn_id)
        if data:
            taken[conn_id] = data
    return taken


def open_connection(server: TankServer, now: float, *, keep_client: bool) -> tuple[int, WSConnection | None]:
    """Accept a socket and complete a real handshake built by wsproto's client ``WSConnection``.

    Returns the connection id and, with ``keep_client``, the client (OPEN, the Hello frame read),
    whose ``send`` makes masked client frames.
    """
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="tank.test", target="/ws"))
    conn_id = server.accept(peer_host="127.0.0.1", now=now)
    server.receive(BytesReceived(conn_id=conn_id, data=request, now=now, wall_time=wall(now)))
    written = take_all(server).get(conn_id, b"")  # the 101 answer, then the Hello frame
    if not written.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {written[:80]!r}")
    if not keep_client:
        return conn_id, None
    client.receive_data(written)
    events = list(client.events())
    if not (isinstance(events[0], AcceptConnection) and isinstance(events[1], TextMessage)):
        raise RuntimeError(f"unexpected handshake events: {events!r}")
    return conn_id, client


def client_send(server: TankServer, conn_id: int, client: WSConnection, text: str, now: float) -> list[Any]:
    frame = client.send(Message(data=text))
    return server.receive(BytesReceived(conn_id=conn_id, data=frame, now=now, wall_time=wall(now)))


# --------------------------------------------------------------------------- (a) publish


def bench_publish(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    subscribers = 1000
    now = T0
    server = TankServer(ServerConfig())
    for _ in range(subscribers):
        conn_id, client = open_connection(server, now, keep_client=True)
        assert client is not None
        acts = client_send(server, conn_id, client, f"sub:{TOPIC}", now)
        assert any(type(a) is TopicSubscribed for a in acts)
    assert len(server.engine.subscribers_of(TOPIC)) == subscribers

    publish = server.publish
    take_ready = server.take_ready
    data_to_send = server.data_to_send
    wall_time = wall(now)
    envelope = render_topic_message(TOPIC, DATA)

    # Sanity: no action, all 1,000 subscribers ready, each with the one frame wsproto would write.
    delivered, actions = publish(TOPIC, DATA, now=now, wall_time=wall_time)
    assert delivered == subscribers and actions == [], actions
    taken = take_all(server)
    assert len(taken) == subscribers and len(set(taken.values())) == 1, len(taken)
    frame = next(iter(taken.values()))
    probe = Connection(ConnectionType.SERVER)
    assert probe.send(Message(data=envelope.decode())) == frame, "frame differs from wsproto"
    frame_size = len(frame)

    def core_contract(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            publish(TOPIC, DATA, now=now, wall_time=wall_time)
            for conn_id in take_ready():
                data_to_send(conn_id)
        return time.perf_counter() - t

    def core_publish_only(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            publish(TOPIC, DATA, now=now, wall_time=wall_time)
        elapsed = time.perf_counter() - t
        take_all(server)  # untimed: keep the outboxes below max_outbox_bytes
        return elapsed

    peers = [Connection(ConnectionType.SERVER) for _ in range(subscribers)]

    def peer_naive(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            # Render once (as the core does), then frame once per subscriber.
            text = '{"topic":' + json.dumps(TOPIC) + ',"data":' + json.dumps(DATA) + "}"
            for conn in peers:
                conn.send(Message(data=text))
        return time.perf_counter() - t

    # Publish-only must stay under max_outbox_bytes between untimed flushes.
    cap_only = ServerConfig().max_outbox_bytes // frame_size // 2
    runs = {
        "core": (core_contract, calibrate(core_contract, opts.sample, 100_000), subscribers),
        "core_publish_only": (core_publish_only, calibrate(core_publish_only, opts.sample, cap_only),
                              subscribers),
        "peer": (peer_naive, calibrate(peer_naive, opts.sample, 100_000), subscribers),
    }
    rates = paired(runs, opts.reps)
    ratio = ratios(rates["core"], rates["peer"])
    assert server.stats().slow_consumer_closes == 0
    out["a_publish"] = {
        "subscribers": subscribers,
        "data_bytes": len(DATA.encode()),
        "frame_bytes": frame_size,
        "publishes_per_sample": {name: r[1] for name, r in runs.items()},
        "core_deliveries_per_s": summary(rates["core"]),
        "core_publish_only_deliveries_per_s": summary(rates["core_publish_only"]),
        "peer_wsproto_deliveries_per_s": summary(rates["peer"]),
        "ratio_core_over_peer": summary(ratio),
        "target_ratio": 5.0,
    }
    if "a" in opts.profile:
        n = runs["core"][1]
        out.setdefault("profiles", {})["a"] = profile(
            f"(a) {n} publishes to {subscribers} + data_to_send per delivery", lambda: core_contract(n))


# --------------------------------------------------------------------------- (b) tick + memory


def bench_tick(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    count = 10_000
    interval = 5.0
    # The idle peers never answer, so the timeout is set far away: each repeated interval then takes
    # the same path as a live connection (ping + text heartbeat + re-arm), never the timeout path.
    config = ServerConfig(heartbeat_interval=interval, heartbeat_timeout=1e9)
    gc.collect()
    server = TankServer(config)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    base, _ = tracemalloc.get_traced_memory()
    t = time.perf_counter()
    for _ in range(count):
        open_connection(server, T0, keep_client=False)
    setup = time.perf_counter() - t
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert server.engine.connection_count == count
    per_conn = (current - base) / count
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    by_file = after.filter_traces(filters).compare_to(before.filter_traces(filters), "filename")
    by_line = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")

    memory = {
        "connections": count,
        "bytes_per_connection": per_conn,
        "by_file": [{"file": _short(s.traceback[0].filename), "bytes_per_connection": s.size_diff / count}
                    for s in by_file[:8] if s.size_diff > 0],
        "by_line": [{"line": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                     "bytes_per_connection": s.size_diff / count}
                    for s in by_line[:12] if s.size_diff > 0],
        "open_seconds_under_tracemalloc": setup,
    }

    tick = server.tick
    ticks: list[float] = []
    flush_times: list[float] = []
    taken_bytes: list[int] = []
    k = 0

    def one_interval(wrap: Callable[[Callable[[], object]], object] | None = None,
                     ) -> tuple[float, float, int]:
        nonlocal k
        k += 1
        now = T0 + k * interval
        assert server.next_deadline() == now, (server.next_deadline(), now)
        gc.collect()
        actions: list[Any] = []
        t = time.perf_counter()
        if wrap is None:
            actions = tick(now, wall_time=wall(now))
        else:
            wrap(lambda: actions.extend(tick(now, wall_time=wall(now))))
        elapsed = time.perf_counter() - t
        # Nothing but bytes: a Ping each (control lane) and a text heartbeat each (data lane).
        assert actions == [], actions[:3]
        t = time.perf_counter()
        taken = take_all(server)
        flush = time.perf_counter() - t
        assert len(taken) == count, len(taken)
        return elapsed, flush, sum(len(b) for b in taken.values())

    one_interval()  # warm-up
    for _ in range(opts.reps):
        elapsed, flush, nbytes = one_interval()
        ticks.append(elapsed)
        flush_times.append(flush)
        taken_bytes.append(nbytes)
    assert server.stats().heartbeat_timeouts == 0 and server.stats().outbox_bytes == 0
    out["b_tick"] = {
        "connections": count,
        "intervals": opts.reps,
        "connections_per_s": summary([count / s for s in ticks]),
        "us_per_connection": summary([s / count * 1e6 for s in ticks]),
        "tick_ms": summary([s * 1e3 for s in ticks]),
        "adapter_take_us_per_connection": summary([s / count * 1e6 for s in flush_times]),
        "taken_bytes_per_interval": summary([float(b) for b in taken_bytes]),
        "memory": memory,
    }
    if "b" in opts.profile:
        texts: list[str] = []
        one_interval(lambda fn: texts.append(profile(
            f"(b) one tick over {count} idle connections", fn)))
        out.setdefault("profiles", {})["b"] = texts[0]


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(Path(__file__).resolve().parent.parent) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --------------------------------------------------------------------------- (c) receive


def bench_receive(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    pool = 1024  # distinct frames (each with its own random mask); one sample = n passes over them
    variants: list[tuple[str, ServerConfig, int, Callable[[int], str]]] = [
        ("relay_off", ServerConfig(relay=False), 0, lambda i: MESSAGE),
        ("relay_on_1_other", ServerConfig(relay=True), 1, lambda i: MESSAGE),
        ("sub_unsub_churn", ServerConfig(relay=False), 0, _churn_message),
    ]
    result: dict[str, Any] = {"message_bytes": len(MESSAGE.encode()), "frames_per_pass": pool}
    now = T0
    wall_time = wall(now)
    for name, config, others, make in variants:
        for per_read in (1, 32):
            gc.collect()
            server = TankServer(config)
            conn_id, client = open_connection(server, now, keep_client=True)
            assert client is not None
            for _ in range(others):
                open_connection(server, now, keep_client=False)
            messages = [make(i) for i in range(pool)]
            assert all(98 <= len(m.encode()) <= 100 for m in messages)
            frames = [client.send(Message(data=m)) for m in messages]
            batches = [b"".join(frames[i:i + per_read]) for i in range(0, pool, per_read)]
            receive = server.receive
            take_ready = server.take_ready
            data_to_send = server.data_to_send

            # Sanity: one pass gives what the variant promises.
            seen: dict[type, int] = {}
            relayed = 0
            for data in batches:
                for action in receive(BytesReceived(conn_id=conn_id, data=data, now=now,
                                                    wall_time=wall_time)):
                    seen[type(action)] = seen.get(type(action), 0) + 1
                taken = take_all(server)
                assert conn_id not in taken, "nothing is written back to the sender"
                relayed += sum(len(b) for b in taken.values())
            if name == "sub_unsub_churn":
                assert seen == {TopicSubscribed: pool // 2, TopicUnsubscribed: pool // 2}, seen
            else:
                assert seen == {MessageReceived: pool}, seen
            # Relay on: each 100-byte message reaches the other client as one 102-byte frame.
            assert relayed == pool * (len(MESSAGE.encode()) + 2) * others, relayed

            def core(n: int, batches: list[bytes] = batches, receive: Any = receive,
                     take_ready: Any = take_ready, data_to_send: Any = data_to_send,
                     conn_id: int = conn_id) -> float:
                t = time.perf_counter()
                for _ in range(n):
                    for data in batches:
                        receive(BytesReceived(conn_id=conn_id, data=data, now=now,
                                              wall_time=wall_time))
                        for other in take_ready():
                            data_to_send(other)
                return time.perf_counter() - t

            peer_conn = Connection(ConnectionType.SERVER)

            def peer(n: int, batches: list[bytes] = batches, ws: Connection = peer_conn) -> float:
                t = time.perf_counter()
                for _ in range(n):
                    for data in batches:
                        ws.receive_data(data)
                        for _event in ws.events():
                            pass
                return time.perf_counter() - t

            runs = {
                "core": (core, calibrate(core, opts.sample / 2, 10_000), pool),
                "peer": (peer, calibrate(peer, opts.sample / 2, 10_000), pool),
            }
            rates = paired(runs, opts.reps)
            stats = server.stats()
            assert stats.slow_consumer_closes == 0 and stats.connections == 1 + others
            result[f"{name}/{per_read}"] = {
                "frames_per_read": per_read,
                "other_clients": others,
                "relay": config.relay,
                "core_msgs_per_s": summary(rates["core"]),
                "peer_wsproto_msgs_per_s": summary(rates["peer"]),
                "core_cost_over_wsproto": summary(ratios(rates["peer"], rates["core"])),
            }
            if "c" in opts.profile and per_read == 1 and name != "relay_on_1_other":
                n = runs["core"][1]
                out.setdefault("profiles", {})[f"c/{name}/{per_read}"] = profile(
                    f"(c) {name}, {per_read} frame/read, {n * pool} messages", lambda n=n, f=core: f(n))
    out["c_receive"] = result


def _churn_message(i: int) -> str:
    """``sub:T`` then ``unsub:T`` over 16 topics of 94 bytes: 98- and 100-byte messages."""
    topic = f"churn-{(i // 2) % 16:02d}-".ljust(94, "t")
    return ("sub:" if i % 2 == 0 else "unsub:") + topic


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def row(label: str, stat: dict[str, Any], unit: str, note: str = "") -> str:
    return (f"  {label:<44}{fmt(stat['median']):>13}{fmt(stat['min']):>13}{fmt(stat['max']):>13}"
            f"  {unit}{'  ' + note if note else ''}")


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print()
    print(f"Tank core benchmark: Python {env['python']}, wsproto {env['wsproto']}, {env['platform']}, "
          f"{env['cpus']} CPUs, commit {env['commit']}, {'quick' if res['quick'] else 'full'} run, "
          f"{res['reps']} reps")
    print(f"  {'':<44}{'median':>13}{'min':>13}{'max':>13}  unit")
    a = res.get("a_publish")
    if a:
        print(f"(a) publish {a['data_bytes']}-byte data to {a['subscribers']:,} subscribers "
              f"(frame {a['frame_bytes']} bytes)")
        print(row("core: publish + data_to_send() per delivery", a["core_deliveries_per_s"],
                  "deliveries/s"))
        print(row("core: publish only (bytes not taken)", a["core_publish_only_deliveries_per_s"],
                  "deliveries/s"))
        print(row("peer: wsproto send() per subscriber", a["peer_wsproto_deliveries_per_s"],
                  "deliveries/s"))
        r = a["ratio_core_over_peer"]
        verdict = "PASS" if r["median"] >= a["target_ratio"] else "FAIL"
        print(row("ratio (a) / peer", r, "x", f"target >= {a['target_ratio']:g}x: {verdict}"))
    b = res.get("b_tick")
    if b:
        print(f"(b) tick over {b['connections']:,} idle connections at their ping time "
              f"({b['intervals']} intervals)")
        print(row("tick: connections serviced", b["connections_per_s"], "conns/s"))
        print(row("tick: time per connection", b["us_per_connection"], "us/conn"))
        print(row("tick: one call", b["tick_ms"], "ms"))
        print(row("adapter: take_ready + data_to_send", b["adapter_take_us_per_connection"],
                  "us/conn", "(not in the tick time)"))
        print(row("bytes taken per interval", b["taken_bytes_per_interval"], "bytes"))
        m = b["memory"]
        print(f"  {'memory per idle connection (tracemalloc)':<44}{fmt(m['bytes_per_connection']):>13}"
              f"{'':>26}  bytes/conn")
        for item in m["by_file"][:6]:
            print(f"    {item['file']:<42}{fmt(item['bytes_per_connection']):>13}{'':>26}  bytes/conn")
    c = res.get("c_receive")
    if c:
        print(f"(c) receive {c['message_bytes']}-byte masked text frames through server.receive()")
        for key, v in c.items():
            if not isinstance(v, dict):
                continue
            name, per_read = key.split("/")
            label = f"{name.replace('_', ' ')}, {per_read} frame{'s' if per_read != '1' else ''}/read"
            print(row(f"core: {label}", v["core_msgs_per_s"], "msgs/s"))
            print(row("  peer: wsproto alone, same bytes", v["peer_wsproto_msgs_per_s"], "msgs/s"))
            print(row("  core cost / wsproto cost", v["core_cost_over_wsproto"], "x"))
    print(f"total {res['elapsed_s']:.1f} s; JSON: {res['json']}")


def _git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when tank_core has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tank_core"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~10 s smoke run (fewer, shorter samples)")
    parser.add_argument("--profile", default="", help="comma-separated sections to profile: a,b,c")
    parser.add_argument("--only", default="a,b,c", help="comma-separated sections to run (default a,b,c)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    opts = parser.parse_args(argv)
    opts.profile = {s.strip() for s in opts.profile.split(",") if s.strip()}
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    opts.reps = 3 if opts.quick else 7
    opts.sample = 0.04 if opts.quick else 0.2  # seconds per sample

    res: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "wsproto": importlib.metadata.version("wsproto"),
            "h11": importlib.metadata.version("h11"),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "gc_enabled_while_timing": gc.isenabled(),
            "commit": _git_commit(),
        },
        "quick": opts.quick,
        "reps": opts.reps,
        "sample_seconds": opts.sample,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start = time.perf_counter()
    sections = [("a", bench_publish), ("b", bench_tick), ("c", bench_receive)]
    for key, fn in sections:
        if key not in only:
            continue
        gc.collect()
        t = time.perf_counter()
        fn(opts, res)
        print(f"section ({key}) done in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    gc.collect()
    res["elapsed_s"] = time.perf_counter() - start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    res["json"] = str(opts.out)
    opts.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
