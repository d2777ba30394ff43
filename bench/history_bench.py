#!/usr/bin/env python3
"""History (issue 11) in the core, on one node: memory per topic, and publish cost with history
on against off, in one run.

(1) Memory: ``tracemalloc`` around a ``HistoryStore`` filled with T topics, each holding N
    publications of D bytes of data, for a few N; reported per topic and per publication.
(2) Publish cost: ``TankServer.publish`` to S subscribers through the sans-IO core (no sockets),
    history on and off, rounds interleaved; the subscribers' output is taken after each publish,
    as an adapter would. Reported as microseconds per publish and the ratio on/off.

Usage: ``python bench/history_bench.py [--quick]``. Numbers are CPU time in this process; run it
on an idle machine and read the ratio, which both sides share.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

from tank_core import History, HistoryPolicy, ServerConfig
from tank_core.server.history_store import HistoryStore
from tank_core.testing import FakeClock, Harness


def memory(sizes: tuple[int, ...], topics: int, data_bytes: int) -> list[tuple[int, float, float]]:
    """(N, bytes per topic, bytes per publication) for each N."""
    out = []
    data = "x" * data_bytes
    for size in sizes:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        store = HistoryStore(History(keep=HistoryPolicy(size=size, ttl=3600.0)), "node")
        for topic in range(topics):
            name = f"topic-{topic}"
            for _ in range(size):
                store.record(name, data, now=0.0, wall_time=0.0)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        out.append((size, used / topics, used / (topics * size)))
        del store
    return out


def publish_cost(history: History | None, subscribers: int, publishes: int) -> float:
    """Microseconds per publish (and taking each subscriber's output)."""
    h = Harness(ServerConfig(history=history), clock=FakeClock(0.0))
    peers = [h.connect(f"u{i}") for i in range(subscribers)]
    for peer in peers:
        peer.send_text("sub:t")
        h.flush(peer.conn_id)
    server = h.server
    ids = [peer.conn_id for peer in peers]
    data = '{"price": 101.25, "size": 300, "venue": "X"}'
    started = time.process_time()
    for n in range(publishes):
        server.publish("t", data, now=float(n), wall_time=0.0)
        for conn_id in server.take_ready():
            server.data_to_send(conn_id)
    elapsed = time.process_time() - started
    del ids
    return elapsed / publishes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    rounds = 3 if opts.quick else 7
    topics = 200 if opts.quick else 1000
    print(f"(1) memory of the history: {topics} topics, 100-byte data")
    print("  publications kept per topic   bytes per topic   bytes per publication")
    for size, per_topic, per_pub in memory((10, 100, 1000), topics, 100):
        print(f"  {size:>27,}   {per_topic:>15,.0f}   {per_pub:>21,.0f}")
    policy = History(keep=HistoryPolicy(size=100, ttl=60.0))
    for subscribers in (1, 1000):
        publishes = 2000 if subscribers == 1 else 200
        on: list[float] = []
        off: list[float] = []
        for _ in range(rounds):
            off.append(publish_cost(None, subscribers, publishes))
            on.append(publish_cost(policy, subscribers, publishes))
        ratios = sorted(a / b for a, b in zip(on, off, strict=True))
        print(f"(2) publish to {subscribers:,} subscriber(s), {rounds} interleaved rounds: "
              f"history off {statistics.median(off):,.1f} us, on {statistics.median(on):,.1f} us "
              f"per publish; on/off {statistics.median(ratios):.2f} "
              f"[{ratios[0]:.2f}-{ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
