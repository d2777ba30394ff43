"""Two ``TankASGI`` nodes sharing a real redis-server (``TankASGI(redis_url=...)``): one under
uvicorn (asyncio), one under hypercorn on trio. Publishes, broadcasts and relays cross the nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgi_support import AsgiProcess, main_args, new_process
from cluster_support import RedisServer, free_port
from e2e_support import connect_hello, expect_next, run


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, AsgiProcess, AsgiProcess]]:
    redis = RedisServer(free_port(), tmp_path / "redis").start()
    nodes = [new_process(server, tmp_path, f"node-{name}", *main_args("--redis-url", redis.url))
             for name, server in (("a", "uvicorn"), ("b", "hypercorn-trio"))]
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.await_ready()  # /tank/readyz says 200 once the node's broker is up
        yield redis, nodes[0], nodes[1]
    finally:
        rcs = [node.stop(timeout=15) if node.proc is not None else 0 for node in nodes]
        redis.stop()
    assert rcs == [0, 0], rcs


def test_publish_on_one_node_reaches_subscribers_on_the_other(
    cluster: tuple[RedisServer, AsgiProcess, AsgiProcess],
) -> None:
    redis, a, b = cluster

    async def main() -> None:
        on_a = await connect_hello(a.url("on-a"), "on-a")
        on_b = await connect_hello(b.url("on-b"), "on-b")
        await on_b.send("sub:news")
        await on_a.send("sub:sport")
        await b.await_stats(lambda s: s["topics"] == {"news": 1} and s["broker_up"] is True)
        await a.await_stats(lambda s: s["topics"] == {"sport": 1} and s["broker_up"] is True)
        await wait_numsub(redis, {"tank:t:news": 1, "tank:t:sport": 1})

        # Node A's API (uvicorn): no subscriber there, but B's gets it through Redis.
        answer = await asyncio.to_thread(a.http, "POST", "/api/publish",
                                         {"topic": "news", "data": "from A"})
        assert answer.status == 200 and answer.json() == {"delivered": 0, "broker": "up"}, answer
        await expect_next(on_b, '{"topic":"news","data":"from A"}')
        # And the other way round (hypercorn on trio to uvicorn).
        answer = await asyncio.to_thread(b.http, "POST", "/api/publish",
                                         {"topic": "sport", "data": "from B"})
        assert answer.json() == {"delivered": 0, "broker": "up"}, answer
        await expect_next(on_a, '{"topic":"sport","data":"from B"}')

        # A broadcast reaches every connection of every node; a relay every other connection.
        answer = await asyncio.to_thread(a.http, "POST", "/api/broadcast", {"data": "everyone"})
        assert answer.json() == {"delivered": 1, "broker": "up"}, answer
        await expect_next(on_a, "everyone")
        await expect_next(on_b, "everyone")
        await on_a.send("relayed from a node-A client")
        await expect_next(on_b, "relayed from a node-A client")
        await on_b.send("relayed from a node-B client")
        await expect_next(on_a, "relayed from a node-B client")  # and not its own relay first

        for node in (a, b):
            stats = await node.astats()
            assert (stats["broker_gaps"], stats["broker_dropped"]) == (0, 0), stats
        await on_a.close()
        await on_b.close()

    run(main())


async def wait_numsub(redis: RedisServer, wanted: dict[str, int], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await asyncio.to_thread(redis.numsub, list(wanted))) != wanted:
        assert loop.time() < deadline, (got, wanted)
        await asyncio.sleep(0.02)
