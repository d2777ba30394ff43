"""The embedding API of a cluster node, in process, on each adapter: ``serve(..., redis_url=...)``.

Two nodes per event loop share the session's Redis. The server object's own calls (``publish``,
``broadcast``, ``send``, ``disconnect``) reach a client on the other node, and the ``on_event`` hook
hears ``BrokerUp`` (and ``BrokerDown`` when this node cannot reach Redis).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import trio
from cluster_support import RedisServer, free_port

import tank_asyncio
import tank_trio
from tank_core import ServerConfig
from tank_core.notifications import BrokerDown, BrokerUp

CONFIG = ServerConfig(heartbeat_interval=0.5, heartbeat_timeout=2.0, close_timeout=0.5)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_asyncio_server_calls_reach_the_other_node(redis_server: RedisServer) -> None:
    async def main() -> None:
        events: list[object] = []
        async with (
            tank_asyncio.serve(CONFIG, "127.0.0.1", 0, redis_url=redis_server.url,
                               on_event=events.append) as a,
            tank_asyncio.serve(CONFIG, "127.0.0.1", 0, redis_url=redis_server.url) as b,
        ):
            while not (a.stats().broker_up and b.stats().broker_up):
                await asyncio.sleep(0.005)
            assert any(isinstance(e, BrokerUp) for e in events)
            topics: list[object] = []
            texts: list[str] = []
            session = tank_asyncio.connect(b.url, user_id="bob", reconnect=False,
                                           on_message=lambda m: texts.append(m.text))
            async with session as client:
                await client.subscribe("news", lambda data, message: topics.append(data))
                await asyncio.to_thread(
                    _wait, lambda: redis_server.numsub(["tank:t:news", "tank:u:bob"]) == {
                        "tank:t:news": 1, "tank:u:bob": 1}, 5, "bob's channels",
                )
                assert a.publish("news", "hello") == 0  # nobody here; bob is on b
                assert a.broadcast("to all") == 0
                assert a.send("bob", "just bob") == 0
                while len(texts) < 3:
                    await asyncio.sleep(0.005)
                assert topics == ["hello"]
                assert texts == ['{"topic":"news","data":"hello"}', "to all", "just bob"]
                assert a.disconnect("bob") == 0
                await asyncio.wait_for(client.wait_closed(), 5)
            assert b.stats().broker_received == 4

    asyncio.run(main())


def test_asyncio_node_without_redis_reports_down(tmp_path: Any) -> None:
    async def main() -> None:
        events: list[object] = []
        url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
        async with tank_asyncio.serve(CONFIG, "127.0.0.1", 0, redis_url=url,
                                      on_event=events.append) as server:
            while not any(isinstance(e, BrokerDown) for e in events):
                await asyncio.sleep(0.005)
            assert server.stats().broker_up is False
            assert server.publish("news", "kept for later") == 0
            assert server.stats().broker_buffered == 1

    asyncio.run(main())


def test_trio_server_calls_reach_the_other_node(redis_server: RedisServer) -> None:
    async def main() -> None:
        events: list[object] = []
        async with trio.open_nursery() as nursery:
            a = await tank_trio.serve_in(nursery, CONFIG, "127.0.0.1", 0, redis_url=redis_server.url,
                                         on_event=events.append)
            b = await tank_trio.serve_in(nursery, CONFIG, "127.0.0.1", 0, redis_url=redis_server.url)
            while not (a.stats().broker_up and b.stats().broker_up):
                await trio.sleep(0.005)
            assert any(isinstance(e, BrokerUp) for e in events)
            topics: list[object] = []
            texts: list[str] = []
            session = tank_trio.connect(b.url, user_id="tbob", reconnect=False,
                                        on_message=lambda m: texts.append(m.text))
            async with session as client:
                await client.subscribe("tnews", lambda data, message: topics.append(data))
                await trio.to_thread.run_sync(
                    _wait, lambda: redis_server.numsub(["tank:t:tnews", "tank:u:tbob"]) == {
                        "tank:t:tnews": 1, "tank:u:tbob": 1}, 5, "tbob's channels",
                )
                assert a.publish("tnews", "hello") == 0
                assert a.broadcast("to all") == 0
                assert a.send("tbob", "just tbob") == 0
                while len(texts) < 3:
                    await trio.sleep(0.005)
                assert topics == ["hello"]
                assert texts == ['{"topic":"tnews","data":"hello"}', "to all", "just tbob"]
                assert a.disconnect("tbob") == 0
                with trio.fail_after(5):
                    await client.wait_closed()
            await a.shutdown()
            await b.shutdown()
            nursery.cancel_scope.cancel()

    trio.run(main)
