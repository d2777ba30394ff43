"""Redis SIGKILLed and restarted on the same port mid-run, under a steady load (issue 5, must show).

A mixed cluster (asyncio, trio, asyncio) shares a private Redis. Each node publishes its own topic
through the HTTP API, one call at a time on a keep-alive connection, every 2 ms; one subscriber per
node takes all three topics. After 1 s Redis is killed with SIGKILL; 1 s later it is started again on
the same port. Measured: how soon the publishers hear "broker": "down", how long until every node is
up again and until every node delivers from every other node, and which messages were lost.

Checked: nothing is delivered twice; per topic, every subscriber sees increasing sequence numbers;
every node's own subscriber gets all of its node's messages (local delivery never stops); every
message answered "up" reached every node; so the lost ones are all among those whose publisher was
told otherwise: "down" (Redis unreachable from the publishing node) or "partial" (Redis took it while
a node known before had not resubscribed yet).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cluster_support import ApiClient, RedisServer, Subscriber, wait_for
from conftest import StartCluster

BACKENDS = ["asyncio", "trio", "asyncio"]
TOPICS = ["k0", "k1", "k2"]  # topic i is published through node i
PERIOD = 0.002
BEFORE, DOWN_FOR, AFTER = 1.0, 1.0, 1.0


def test_redis_killed_and_restarted_mid_run(
    private_redis: RedisServer, start_cluster: StartCluster, report_figure: Callable[[str], None]
) -> None:
    private_redis.start()
    nodes = start_cluster(BACKENDS, private_redis.url)

    async def scenario() -> dict[str, Any]:
        subs = [await Subscriber.connect(n.port, f"s{i}", TOPICS, timed=True)
                for i, n in enumerate(nodes)]
        await asyncio.to_thread(
            wait_for, lambda: private_redis.numsub([f"tank:t:{t}" for t in TOPICS]) == {
                f"tank:t:{t}": 3 for t in TOPICS}, 10, "interest",
        )
        records: list[tuple[int, int, float, float, str]] = []  # node, seq, sent, answered, broker
        stop = asyncio.Event()

        async def publisher(index: int) -> None:
            api = await ApiClient.open(nodes[index].port)
            seq = 0
            while not stop.is_set():
                sent = time.monotonic()
                answer = await api.post("/api/publish", {"topic": TOPICS[index], "data": f"{index}:{seq}"})
                records.append((index, seq, sent, time.monotonic(), answer["broker"]))
                assert answer["delivered"] == 1
                seq += 1
                await asyncio.sleep(PERIOD)
            await api.close()

        up_at: dict[int, float] = {}

        async def watch_up(after: float) -> None:
            while len(up_at) < len(nodes):
                for index, node in enumerate(nodes):
                    if index not in up_at and (await asyncio.to_thread(node.stats))["broker_up"]:
                        up_at[index] = time.monotonic()
                await asyncio.sleep(0.005)

        tasks = [asyncio.get_running_loop().create_task(publisher(i)) for i in range(len(nodes))]
        await asyncio.sleep(BEFORE)
        killed = time.monotonic()
        private_redis.kill()
        await asyncio.sleep(DOWN_FOR)
        await asyncio.to_thread(private_redis.start)  # returns once it answers PING
        restarted = time.monotonic()
        await asyncio.wait_for(watch_up(restarted), 20)
        await asyncio.sleep(AFTER)
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.5)  # let the last deliveries land
        for sub in subs:
            sub.abort()
        return {"subs": subs, "records": records, "killed": killed, "restarted": restarted,
                "up_at": up_at}

    result = asyncio.run(scenario())
    subs: list[Subscriber] = result["subs"]
    records = result["records"]
    killed, restarted, up_at = result["killed"], result["restarted"], result["up_at"]

    arrivals = [{data: at for _topic, data, at in sub.arrivals} for sub in subs]
    for index, sub in enumerate(subs):
        counts = Counter(data for _topic, data, _at in sub.arrivals)
        assert max(counts.values()) == 1, f"duplicates at node {index}"
        for topic in TOPICS:  # per topic, increasing sequence numbers
            seqs = [int(d.split(":")[1]) for t, d, _ in sub.arrivals if t == topic]
            assert seqs == sorted(seqs), (index, topic)
    lost: list[tuple[int, int, str]] = []
    reached_anyway = Counter[str]()
    for origin, seq, _sent, _answered, broker in records:
        data = f"{origin}:{seq}"
        assert data in arrivals[origin], f"local delivery failed for {data}"
        reached = all(data in arrivals[n] for n in range(len(nodes)))
        if broker == "up":
            assert reached, f"{data} was answered 'up' but did not reach every node"
        elif reached:
            reached_anyway[broker] += 1
        if not reached:
            lost.append((origin, seq, broker))
    assert all(broker in ("down", "partial") for _o, _s, broker in lost)
    answers = Counter(r[4] for r in records)
    down = [r for r in records if r[4] == "down"]
    told = [r for r in records if r[4] != "up"]
    assert down, "no publish was answered 'down' while Redis was dead"
    first_down = {o: min(r[3] for r in down if r[0] == o) - killed for o in range(len(nodes))}
    mesh = max(
        min(at for data, at in arrivals[n].items() if int(data.split(":")[0]) == o and at > restarted)
        for n in range(len(nodes)) for o in range(len(nodes)) if o != n
    ) - restarted
    up_after = [up_at[i] - restarted for i in range(len(nodes))]
    told_window = (min(r[2] for r in told) - killed, max(r[3] for r in told) - killed)
    lost_by = Counter(broker for _o, _s, broker in lost)
    report_figure(
        f"outage: Redis SIGKILLed after {BEFORE:.0f} s of load ({len(records)} publishes, 1 every "
        f"{PERIOD * 1000:.0f} ms per node), restarted {DOWN_FOR:.1f} s later on the same port"
    )
    report_figure(
        "outage: publishers answered 'down' "
        + ", ".join(f"{BACKENDS[o]} {first_down[o] * 1000:.0f} ms" for o in range(len(nodes)))
        + " after the kill; broker up again "
        + ", ".join(f"{BACKENDS[i]} {up_after[i] * 1000:.0f} ms" for i in range(len(nodes)))
        + f" after Redis was back; every node delivering from every other {mesh * 1000:.0f} ms after"
    )
    report_figure(
        f"outage: answers {answers['up']} 'up', {answers['down']} 'down', {answers['partial']} "
        f"'partial' (the not-'up' ones sent {told_window[0]:.2f}-{told_window[1]:.2f} s after the "
        f"kill); lost on some node: {lost_by['down']} 'down' + {lost_by['partial']} 'partial' = "
        f"{len(lost)}, every one told so; reached every node anyway: {reached_anyway['down']} 'down' "
        f"(outage buffer) + {reached_anyway['partial']} 'partial'; 0 of {answers['up']} 'up' lost; "
        f"0 duplicates"
    )
