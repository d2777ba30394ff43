"""The Python client recovers on its own (issue 11): with a server that keeps a history, each
reconnect replays what its topics missed, in order and once, and ``on_recover`` says whether
that was all of it. On asyncio and trio."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from client_backends import Backend
from client_support import FAST, QUICK

from tank_core import History, HistoryPolicy


def test_a_dropped_client_gets_what_it_missed_once_in_order(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        config = replace(FAST, history=History(keep=HistoryPolicy(size=100, ttl=60.0)))
        server = await b.start_server(config)
        recovered: list[tuple[str, bool]] = []
        options = {**QUICK, "reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.1}
        async with b.connect(server.url, user_id="alice", on_recover=lambda t, c: recovered.append(
                (t, c)), **options) as client:
            stream = client.messages("news")
            outcomes = client.messages("news", recoveries=True)  # the same, and each recovery
            await b.eventually(lambda: server.stats().topics.get("news") == 1)
            assert recovered == [("news", True)]  # the first subscription learns its place
            server.publish("news", "m1")
            assert (await b.wait_for(stream.__anext__(), 2)).data == "m1"
            assert server.disconnect("alice") == 1  # dropped: 1000, then the client reconnects
            await b.eventually(lambda: server.stats().topics.get("news") is None)
            for n in range(2, 6):
                server.publish("news", f"m{n}")  # nobody subscribed: only the history has them
            got = [(await b.wait_for(stream.__anext__(), 3)).data for _ in range(4)]
            assert got == ["m2", "m3", "m4", "m5"]
            await b.eventually(lambda: recovered == [("news", True), ("news", True)])
            server.publish("news", "m6")  # live again, after the replay
            assert (await b.wait_for(stream.__anext__(), 2)).data == "m6"
            items = [await b.wait_for(outcomes.__anext__(), 2) for _ in range(8)]
            assert [(m.recovered, m.data) for m in items] == [
                (True, None), (None, "m1"), (None, "m2"), (None, "m3"), (None, "m4"),
                (None, "m5"), (True, None), (None, "m6"),
            ]

    backend.run(body)


def test_a_gap_the_history_cannot_cover_is_reported(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        config = replace(FAST, history=History(keep=HistoryPolicy(size=2, ttl=60.0)))
        server = await b.start_server(config)
        recovered: list[tuple[str, bool]] = []
        seen: list[Any] = []
        options = {**QUICK, "reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.1}
        async with b.connect(server.url, user_id="bob", on_recover=lambda t, c: recovered.append(
                (t, c)), on_message=seen.append, **options) as client:
            await client.subscribe("t")
            await b.eventually(lambda: recovered == [("t", True)])
            server.disconnect("bob")
            await b.eventually(lambda: server.stats().topics.get("t") is None)
            for n in range(5):  # 5 publications, only 2 kept
                server.publish("t", f"x{n}")
            await b.eventually(lambda: recovered == [("t", True), ("t", False)])
            assert not [m for m in seen if m.topic == "t"]  # nothing replayed over a gap
            server.publish("t", "live")
            await b.eventually(lambda: [m.data for m in seen if m.topic == "t"] == ["live"])

    backend.run(body)
