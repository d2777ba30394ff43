"""The tank-websocket.js 2.0.3 client (replayed over Node's `ws`) against a server that restarts.

The client must resubscribe on every reconnect, retry on its fixed 1 s tick, classify topic
messages as 2.0.3 does, and leave cleanly on close(). The server is stopped gracefully (SIGTERM:
the client sees `Server is shutting down` and 1001) and then killed (SIGKILL: 1006), and a new one
is started each time on the port the first one got. Over wss:// Node trusts the test's CA through
``NODE_EXTRA_CA_CERTS``, and every server presents the same certificate.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time

from e2e_support import NodeClient, StartServer, run


def test_js_client_resubscribes_across_restarts(start_server: StartServer) -> None:
    first = start_server()
    port = first.port

    async def main() -> None:
        node = await NodeClient.start(first.url("node-1"))
        try:
            await scenario(node)
        finally:
            await node.stop()

    async def scenario(node: NodeClient) -> None:
        # An application subscribing right after construction (while the socket is connecting):
        # the direct `sub:` sends fail and are logged; the open sends one per stored entry.
        await node.command("sub", topic="news")
        await node.command("sub", topic="news")  # the broken dedupe keeps two entries
        await node.command("sub", topic="sport")
        opened = await node.wait_event(lambda e: e["ev"] == "open", what="open")
        hello = await node.wait_event(lambda e: e["ev"] == "message", start=opened)
        assert node.events[hello]["data"] == "Hello, node-1! Welcome to WebSocket server."
        await first.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1}, what="subs")
        # (The open handler sends before the harness hears of the open: sends are read from 0.)
        subs_sent = [e["data"] for e in node.since(0, "sent") if e["readyState"] == 1]
        assert subs_sent == ["sub:news", "sub:news", "sub:sport"], node.since(0, "sent")

        # A publish reaches both stored `news` entries, then onMessage gets the raw text.
        mark = len(node.events)
        assert await first.apublish("news", "n1") == 1
        raw = await node.wait_event(
            lambda e: e["ev"] == "message" and "n1" in e["data"], start=mark, what="raw n1"
        )
        topic_events = node.since(mark, "topic")
        assert [(e["topic"], e["data"]) for e in topic_events] == [("news", "n1"), ("news", "n1")]
        assert all(node.events.index(e) < raw for e in topic_events), "callbacks before onMessage"
        assert json.loads(node.events[raw]["data"]) == {"topic": "news", "data": "n1"}

        # Node's ws offers permessage-deflate: a large publish goes out compressed, and reads the same.
        mark = len(node.events)
        big = json.dumps([{"symbol": f"S{i}", "bid": 100 + i, "ask": 101 + i} for i in range(20)])
        assert await first.apublish("news", big) == 1
        await node.wait_event(
            lambda e: e["ev"] == "topic" and e["data"] == big, start=mark, what="big"
        )
        await first.await_stats(
            lambda s: s["compressed_connections"] == 1 and s["messages_compressed"] == 1,
            what="one compressed message",
        )

        # Classification as 2.0.3 does it, for raw broadcasts.
        mark = len(node.events)
        cases = [
            ('{"topic":"news","data":{"nested":[1,2]}}', [("news", {"nested": [1, 2]})]),
            ('{"topic":"sport","data":7}', [("sport", 7)]),
            ('{"topic":"other","data":"x"}', []),  # no stored entry
            ('topic first: not a topic message', []),  # index 0
            ('{"data":"no such key"}', []),
            ('a topic inside, not JSON', []),  # parse error, logged and ignored
            ('{"topic":"","data":"falsy topic"}', []),
            ("end-of-cases", []),
        ]
        for text, _ in cases:
            await first.abroadcast(text)
        await node.wait_event(
            lambda e: e["ev"] == "message" and e["data"] == "end-of-cases", start=mark, what="end"
        )
        messages = [e["data"] for e in node.since(mark, "message") if e["data"] != "heartbeat"]
        assert messages == [text for text, _ in cases]
        topics = [(e["topic"], e["data"]) for e in node.since(mark, "topic")]
        assert topics == [("news", {"nested": [1, 2]}), ("news", {"nested": [1, 2]}), ("sport", 7)]
        assert [e["data"] for e in node.since(mark, "parse-error")] == ["a topic inside, not JSON"]

        # The server's text heartbeats simply reach onMessage; the client never answers them.
        await asyncio.sleep(0.5)
        assert any(e["data"] == "heartbeat" for e in node.since(opened, "message"))
        assert all(e["data"].startswith(("sub:", "unsub:")) for e in node.since(opened, "sent"))

        # --- restart 1: graceful stop, server down for ~2.5 s, then a new server on the same port.
        mark = len(node.events)
        first.send_signal(signal.SIGTERM)
        closed = await node.wait_event(lambda e: e["ev"] == "close", start=mark, what="close")
        assert node.events[closed]["code"] == 1001
        bye = [e["data"] for e in node.since(mark, "message")]
        assert bye[-1] == "Server is shutting down", bye
        assert await asyncio.to_thread(first.wait, 10) == 0
        await asyncio.sleep(2.5)
        second = await asyncio.to_thread(start_server, port=port)
        assert second.port == port
        await node.wait_event(lambda e: e["ev"] == "open", start=closed, timeout=5, what="reopen")
        attempts = [e["t"] for e in node.since(closed, "connecting")]
        assert len(attempts) >= 2, attempts  # it kept trying while the server was down
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert all(800 <= gap <= 1600 for gap in gaps), gaps  # the fixed 1 s tick, no backoff
        # The next 1 s tick retries, unless the last open is under 1 s old (2.0.3's guard).
        assert attempts[0] - node.events[closed]["t"] <= 2100
        resent = [e["data"] for e in node.since(closed, "sent") if e["readyState"] == 1]
        assert resent == ["sub:news", "sub:news", "sub:sport"], resent
        await second.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1}, what="resub")
        mark = len(node.events)
        assert await second.apublish("sport", "after restart") == 1
        await node.wait_event(
            lambda e: e["ev"] == "topic" and e["data"] == "after restart", start=mark, what="n2"
        )

        # --- restart 2: the server is killed (no Close: 1006) and restarted at once.
        mark = len(node.events)
        killed_at = time.monotonic()
        second.kill()
        closed = await node.wait_event(lambda e: e["ev"] == "close", start=mark, what="close 2")
        assert node.events[closed]["code"] == 1006
        third = await asyncio.to_thread(start_server, port=port)
        await node.wait_event(lambda e: e["ev"] == "open", start=closed, timeout=5, what="reopen 2")
        await third.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1}, what="resub 2")
        resubscribed_after = time.monotonic() - killed_at
        assert resubscribed_after < 4, resubscribed_after
        mark = len(node.events)
        assert await third.apublish("news", "after kill") == 1
        await node.wait_event(
            lambda e: e["ev"] == "topic" and e["data"] == "after kill", start=mark, what="n3"
        )
        # A relay from the JS client reaches another client (case 4).
        from e2e_support import connect_hello, expect_next

        other = await connect_hello(third.url("py"), "py")
        await node.command("send", data="from node")
        await expect_next(other, "from node")

        # --- close(): unsub per stored entry, a Close without status, and no reconnect.
        mark = len(node.events)
        await node.command("close")
        await node.wait_event(lambda e: e["ev"] == "closed-by-app", start=mark, what="closed")
        assert [e["data"] for e in node.since(mark, "sent")] == [
            "unsub:news", "unsub:news", "unsub:sport",
        ]
        await third.await_stats(lambda s: s["connections"] == 1 and s["topics"] == {})
        await asyncio.sleep(1.5)
        assert node.since(mark, "connecting") == []
        assert (await third.astats())["connections"] == 1
        await other.close()

    run(main(), timeout=60)
