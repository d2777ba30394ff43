"""Several `tank serve` processes sharing a real Redis (issue 5): every node reaches every node.

- 10,000 publishes spread over 3 nodes (asyncio, trio, and a mixed cluster): every subscriber on
  every node gets every message of its topics exactly once, in per-topic publish order, and a node
  receives from Redis only the topics it has subscribers for.
- Relay, broadcast and disconnect-by-user-id cross the nodes, exactly once, never back to the sender.
- A node started while Redis is unreachable serves locally, says so, and joins when Redis comes.

Publishing order: each topic is published through one node on one HTTP connection (pipelined,
keep-alive), so "publish order" is that connection's order. A node delivers its own publishes
locally first and other nodes' through Redis, so two nodes publishing one topic at once have no
common order (docs/scale-out.md); per origin, order is kept.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from cluster_support import Node, RedisServer, Subscriber, pipeline, wait_for
from conftest import StartCluster

CLUSTERS = {
    "asyncio": ["asyncio", "asyncio", "asyncio"],
    "trio": ["trio", "trio", "trio"],
    "mixed": ["asyncio", "trio", "asyncio"],
}
PUBLISHES = 10_000
TOPICS = 24
SUBSCRIBERS_PER_NODE = 4
CONNECTIONS_PER_NODE = 2


def owner(topic: int) -> int:
    return topic % 3


def interest_plan(seed: int) -> dict[tuple[int, int], list[str]]:
    """(node, subscriber) -> topics. t0: subscribers only away from its publishing node; t1:
    nobody anywhere; t2: only on its own node; the rest at random."""
    rng = random.Random(seed)
    plan: dict[tuple[int, int], list[str]] = {}
    for node in range(3):
        for sub in range(SUBSCRIBERS_PER_NODE):
            topics = []
            for topic in range(TOPICS):
                if topic == 0:
                    wanted = node != 0
                elif topic == 1:
                    wanted = False
                elif topic == 2:
                    wanted = node == 2
                else:
                    wanted = rng.random() < 0.5
                if wanted:
                    topics.append(f"t{topic}")
            plan[node, sub] = topics
    return plan


async def astats(node: Node) -> dict[str, Any]:
    return await asyncio.to_thread(node.stats)


async def await_interest(redis: RedisServer, nodes: list[Node], plan: dict[tuple[int, int], list[str]]
                         ) -> None:
    """Until Redis has exactly the channels the plan implies, per node."""
    wanted = {f"tank:t:t{t}": len({n for (n, _), ts in plan.items() if f"t{t}" in ts})
              for t in range(TOPICS)}

    def ready() -> bool:
        return redis.numsub(list(wanted)) == wanted

    deadline = time.monotonic() + 15
    while not await asyncio.to_thread(ready):
        assert time.monotonic() < deadline, (redis.numsub(list(wanted)), wanted)
        await asyncio.sleep(0.01)
    for node in nodes:
        assert (await astats(node))["broker_up"] is True


@pytest.mark.parametrize("name", list(CLUSTERS))
def test_ten_thousand_publishes_reach_every_subscriber_once_in_order(
    name: str, redis_server: RedisServer, start_cluster: StartCluster,
    report_figure: Callable[[str], None],
) -> None:
    nodes = start_cluster(CLUSTERS[name], redis_server.url)
    plan = interest_plan(seed=5)

    async def scenario() -> None:
        subs: dict[tuple[int, int], Subscriber] = {}
        for (node, sub), topics in plan.items():
            subs[node, sub] = await Subscriber.connect(nodes[node].port, f"n{node}s{sub}", topics)
        await await_interest(redis_server, nodes, plan)
        calls: dict[tuple[int, int], list[tuple[str, dict[str, Any]]]] = {}
        for k in range(PUBLISHES):
            topic = k % TOPICS
            key = (owner(topic), (topic // 3) % CONNECTIONS_PER_NODE)
            calls.setdefault(key, []).append(("/api/publish", {"topic": f"t{topic}", "data": str(k)}))
        expected = {key: sum(len(range(int(t[1:]), PUBLISHES, TOPICS)) for t in topics)
                    for key, topics in plan.items()}
        start = time.monotonic()
        keys = sorted(calls)
        answers = await asyncio.gather(*(pipeline(nodes[n].port, calls[n, c]) for n, c in keys))
        published = time.monotonic() - start
        for key, batch in zip(keys, answers, strict=True):
            for (_, body), answer in zip(calls[key], batch, strict=True):
                local = sum(body["topic"] in plan[key[0], s] for s in range(SUBSCRIBERS_PER_NODE))
                assert answer == {"delivered": local, "broker": "up"}, (body, answer)
        deadline = time.monotonic() + 30
        while any(subs[key].count < expected[key] for key in subs):
            assert time.monotonic() < deadline, {k: (s.count, expected[k]) for k, s in subs.items()}
            await asyncio.sleep(0.005)
        delivered = time.monotonic() - start
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
        for key, sub in subs.items():
            for topic in plan[key]:
                number = int(topic[1:])
                assert sub.by_topic.get(topic, []) == [str(k) for k in range(number, PUBLISHES, TOPICS)], (
                    key, topic,
                )
            assert set(sub.by_topic) <= set(plan[key]) and not sub.texts
        for index, node in enumerate(nodes):
            stats = await astats(node)
            assert (stats["broker_gaps"], stats["broker_duplicates"], stats["broker_dropped"]) == (0, 0, 0)
            # Interest routing: only topics with a subscriber here came through Redis.
            incoming = sum(
                len(range(t, PUBLISHES, TOPICS)) for t in range(TOPICS)
                if owner(t) != index
                and any(f"t{t}" in plan[index, s] for s in range(SUBSCRIBERS_PER_NODE))
            )
            assert stats["broker_received"] == incoming, (index, stats["broker_received"], incoming)
            assert stats["broker_published"] == sum(len(calls.get((index, c), []))
                                                    for c in range(CONNECTIONS_PER_NODE))
        total = sum(expected.values())
        cross = sum(
            len(range(int(t[1:]), PUBLISHES, TOPICS))
            for (node, _), topics in plan.items() for t in topics if owner(int(t[1:])) != node
        )
        report_figure(
            f"cluster {name} ({', '.join(CLUSTERS[name])}): {PUBLISHES} publishes over 3 nodes "
            f"(HTTP, pipelined, {CONNECTIONS_PER_NODE} connections/node) answered in {published:.2f} s "
            f"({PUBLISHES / published:,.0f}/s); {total:,} deliveries to {len(subs)} subscribers "
            f"({cross:,} cross-node) all in by {delivered:.2f} s; each exactly once, in order"
        )
        for sub in subs.values():
            sub.abort()

    asyncio.run(scenario())


def test_relay_broadcast_and_disconnect_cross_the_nodes(
    redis_server: RedisServer, start_cluster: StartCluster
) -> None:
    nodes = start_cluster(CLUSTERS["mixed"], redis_server.url)

    async def scenario() -> None:
        clients = [await Subscriber.connect(node.port, f"c{i}", []) for i, node in enumerate(nodes)]
        twins = [await Subscriber.connect(nodes[i].port, "twin", []) for i in (0, 2)]
        await asyncio.to_thread(
            wait_for, lambda: redis_server.numsub(["tank:u:twin", "tank:all"]) == {
                "tank:u:twin": 2, "tank:all": 3}, 10, "user channels",
        )
        everyone = clients + twins
        clients[0].send_text("relayed once")
        await asyncio.to_thread(
            wait_for, lambda: all(c.texts == ["relayed once"] for c in everyone[1:]), 5, "relay"
        )
        status, answer = await asyncio.to_thread(nodes[1].http, "POST", "/api/broadcast",
                                                 {"data": "to everyone"})
        assert (status, answer) == (200, {"delivered": 1, "broker": "up"})
        await asyncio.to_thread(
            wait_for, lambda: all(c.texts[-1:] == ["to everyone"] for c in everyone), 5, "broadcast"
        )
        assert clients[0].texts == ["to everyone"]  # never its own relay back
        assert all(c.texts == ["relayed once", "to everyone"] for c in everyone[1:])
        status, answer = await asyncio.to_thread(nodes[1].http, "POST", "/api/disconnect",
                                                 {"user_id": "twin"})
        assert (status, answer) == (200, {"closed": 0, "broker": "up"})
        codes = await asyncio.wait_for(asyncio.gather(*(t.closed for t in twins)), 5)
        assert codes == [1000, 1000]
        await asyncio.sleep(0.2)
        assert all(not c.closed.done() for c in clients)
        for client in clients:
            client.abort()

    asyncio.run(scenario())


def test_a_node_without_redis_serves_locally_and_joins_when_redis_comes(
    private_redis: RedisServer, start_cluster: StartCluster
) -> None:
    nodes = start_cluster(["asyncio", "trio"], private_redis.url)

    async def scenario() -> None:
        subs = [await Subscriber.connect(node.port, f"s{i}", ["news"]) for i, node in enumerate(nodes)]
        for node in nodes:
            stats = await astats(node)
            assert stats["broker_up"] is False and stats["topics"] == {"news": 1}
        status, answer = await asyncio.to_thread(
            nodes[0].http, "POST", "/api/publish", {"topic": "news", "data": "local only"}
        )
        assert (status, answer) == (200, {"delivered": 1, "broker": "down"})
        metrics = await asyncio.to_thread(nodes[1].http, "GET", "/metrics")
        assert "tank_broker_up 0" in metrics[1]
        await asyncio.to_thread(private_redis.start)
        await asyncio.to_thread(
            wait_for, lambda: all(n.stats()["broker_up"] for n in nodes), 15, "broker up"
        )
        await asyncio.to_thread(
            wait_for, lambda: private_redis.numsub(["tank:t:news"]) == {"tank:t:news": 2}, 5, "interest"
        )
        status, answer = await asyncio.to_thread(
            nodes[1].http, "POST", "/api/publish", {"topic": "news", "data": "everywhere"}
        )
        assert (status, answer) == (200, {"delivered": 1, "broker": "up"})
        await asyncio.to_thread(
            wait_for, lambda: all(s.by_topic["news"][-1:] == ["everywhere"] for s in subs), 5, "delivery"
        )
        # "local only" waited in the outage buffer and went out once Redis was there.
        assert subs[0].by_topic["news"] == ["local only", "everywhere"]
        assert subs[1].by_topic["news"] in (["everywhere"], ["local only", "everywhere"])
        for sub in subs:
            sub.abort()

    asyncio.run(scenario())
