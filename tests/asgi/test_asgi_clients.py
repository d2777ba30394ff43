"""Real clients against ``TankASGI`` under each ASGI server: the tank-websocket.js 2.0.3 client
(replayed over Node's ``ws``, tests/e2e/node) and our own Python client (``tank_asyncio.connect``)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgi_support import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, AsgiProcess
from e2e_support import NodeClient, connect_hello, expect_next, hello, run, wait_for

import tank_asyncio


async def quiet(app: AsgiProcess) -> None:
    await app.await_stats(lambda s: s["connections"] == 0, timeout=5, what="no connections")


# ------------------------------------------------------------------------------------ tank-websocket.js


def test_tank_websocket_js_subscribes_receives_publishes_and_heartbeats(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        node = await NodeClient.start(main_app.url("node-1"))
        try:
            await scenario(node)
        finally:
            await node.stop()

    async def scenario(node: NodeClient) -> None:
        # Subscribing while the socket connects: the open sends `sub:` for every stored entry.
        await node.command("sub", topic="news")
        await node.command("sub", topic="sport")
        opened = await node.wait_event(lambda e: e["ev"] == "open", what="open")
        first = await node.wait_event(lambda e: e["ev"] == "message", start=opened, what="hello")
        assert node.events[first]["data"] == hello("node-1")
        await main_app.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1}, what="subs")

        # A publish through the API reaches the topic callback, then onMessage with the raw text.
        mark = len(node.events)
        assert await main_app.apublish("news", "n1") == 1
        raw = await node.wait_event(lambda e: e["ev"] == "message" and "n1" in e["data"],
                                    start=mark, what="raw n1")
        topic_events = node.since(mark, "topic")
        assert [(e["topic"], e["data"]) for e in topic_events] == [("news", "n1")]
        assert node.events.index(topic_events[0]) < raw  # the callback first
        assert json.loads(node.events[raw]["data"]) == {"topic": "news", "data": "n1"}

        # The server's text heartbeats reach onMessage every interval; the client never answers.
        mark = len(node.events)
        await asyncio.sleep(5 * HEARTBEAT_INTERVAL)
        beats = [e for e in node.since(mark, "message") if e["data"] == "heartbeat"]
        assert len(beats) >= 3, node.events[mark:]
        assert all(e["data"].startswith(("sub:", "unsub:")) for e in node.since(opened, "sent"))

        # Relays both ways with a websockets client.
        other = await connect_hello(main_app.url("py"), "py")
        await node.command("send", data="from node")
        await expect_next(other, "from node")
        mark = len(node.events)
        await other.send("to node")
        await node.wait_event(lambda e: e["ev"] == "message" and e["data"] == "to node",
                              start=mark, what="relay to node")

        # close(): unsub per stored entry, a Close without status, the server lets it go.
        mark = len(node.events)
        await node.command("close")
        await node.wait_event(lambda e: e["ev"] == "closed-by-app", start=mark, what="closed")
        assert [e["data"] for e in node.since(mark, "sent")] == ["unsub:news", "unsub:sport"]
        await main_app.await_stats(lambda s: s["connections"] == 1 and s["topics"] == {})
        await other.close()

    run(main(), timeout=30)


# ------------------------------------------------------------------------------------ tank_asyncio


def test_python_client_subscribes_streams_and_sends(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        beats: list[float] = []
        sport: list[object] = []
        async with tank_asyncio.connect(
            main_app.ws_url, user_id="py", token="ok", reconnect=False,
            on_heartbeat=lambda: beats.append(time.monotonic()),
        ) as client:
            assert client.connected and client.user_id == "py"
            stream = client.messages("news")
            await client.subscribe("sport", lambda data, message: sport.append(data))
            await main_app.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1})
            assert await main_app.apublish("news", "n1") == 1
            assert await main_app.apublish("sport", "s1") == 1
            assert await main_app.apublish("news", "n2") == 1
            first = await asyncio.wait_for(anext(stream), 3)
            second = await asyncio.wait_for(anext(stream), 3)
            assert (first.topic, first.data, second.data) == ("news", "n1", "n2")
            assert first.text == '{"topic":"news","data":"n1"}'
            await wait_for(lambda: sport == ["s1"], what="the sport callback")

            other = await connect_hello(main_app.url("other"), "other")
            await client.send("from python")
            await expect_next(other, "from python")
            await other.close()

            await client.unsubscribe("news")
            await main_app.await_stats(lambda s: s["topics"] == {"sport": 1}, what="news gone")
            await wait_for(lambda: len(beats) >= 3, what="three text heartbeats")
        await quiet(main_app)

    run(main())


def test_python_client_refused_with_401(main_app: AsgiProcess) -> None:
    async def main() -> None:
        closes: list[tuple[int, str]] = []
        with pytest.raises(ConnectionError, match="401"):
            async with tank_asyncio.connect(
                main_app.ws_url, user_id="py", token="bad", reconnect=False,
                on_close=lambda code, reason: closes.append((code, reason)),
            ):
                raise AssertionError("the body never runs")
        assert len(closes) == 1 and closes[0][0] == 1006 and "401" in closes[0][1], closes

    run(main())


def test_python_client_heartbeats_keep_it_alive_under_close_silent(silent_app: AsgiProcess) -> None:
    """``close_silent=True`` is right when every client sends heartbeats: ours does."""

    async def main() -> None:
        await quiet(silent_app)
        before = (await silent_app.astats())["heartbeat_timeouts"]
        closes: list[tuple[int, str]] = []
        async with tank_asyncio.connect(
            silent_app.ws_url, user_id="beating", heartbeat_interval=HEARTBEAT_INTERVAL,
            heartbeat_timeout=1.0, on_close=lambda code, reason: closes.append((code, reason)),
        ) as client:
            stream = client.messages("t")
            await silent_app.await_stats(lambda s: s["topics"] == {"t": 1})
            await asyncio.sleep(3 * HEARTBEAT_TIMEOUT)  # three silence timeouts of the server
            assert closes == [] and client.connected
            assert await silent_app.apublish("t", "still connected") == 1
            message = await asyncio.wait_for(anext(stream), 3)
            assert message.data == "still connected"
        assert closes == [(1000, "")]
        assert (await silent_app.astats())["heartbeat_timeouts"] == before

    run(main())
