"""Time under trio: one timer task for the whole server (no per-connection timer tasks), pings on
every connection, and a silent peer closed 1011 between ``heartbeat_timeout`` and + 0.5 s."""

from __future__ import annotations

import trio
from trio_helpers import FAST, RawClient, count_tasks, run, start
from wsproto.events import CloseConnection

from tank_core import HeartbeatTimedOut, ServerConfig


def test_exactly_one_timer_task_and_two_tasks_per_connection() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            before = count_tasks()
            server = await start(nursery, FAST)
            base = count_tasks() - before  # timer, accept loop, shutdown guard, serve itself
            assert count_tasks("tank timer") == 1
            clients = [await RawClient.connect(server.port) for _ in range(30)]
            for client in clients:
                await client.recv_text()
            assert count_tasks("tank timer") == 1
            assert count_tasks("tank reader") == 30
            assert count_tasks("tank writer") == 30
            assert count_tasks() - before == base + 2 * 30

            # The one timer drives every connection's pings.
            async def read_a_while(client: RawClient) -> None:
                with trio.move_on_after(3 * FAST.heartbeat_interval):
                    while True:
                        await client.next_event()

            async with trio.open_nursery() as readers:
                for client in clients:
                    readers.start_soon(read_a_while, client)
            assert all(client.pings >= 2 for client in clients)
            assert server.stats().pings_sent >= 60
            assert count_tasks("tank timer") == 1

            for client in clients:
                await client.aclose()
            with trio.fail_after(5):
                while count_tasks("tank reader") or count_tasks("tank writer"):
                    await trio.sleep(0.01)
            assert count_tasks() - before == base
            nursery.cancel_scope.cancel()

    run(body)


def test_silent_peer_closed_1011_in_time_while_others_keep_getting_pings() -> None:
    config = FAST
    timeouts: list[HeartbeatTimedOut] = []
    measured: dict[str, float] = {}

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, config, on_event=lambda e: (
                timeouts.append(e) if isinstance(e, HeartbeatTimedOut) else None
            ))
            others = [await RawClient.connect(server.port) for _ in range(50)]

            async def keep_reading(client: RawClient) -> None:
                while True:
                    await client.next_event()

            async with trio.open_nursery() as readers:
                for client in others:
                    readers.start_soon(keep_reading, client)

                # The silent peer: its last bytes are the upgrade request; it reads but never
                # answers a Ping.
                sent_at = trio.current_time()
                silent = await RawClient.connect(server.port, auto_pong=False)
                accepted_at = trio.current_time()
                pings_before = [c.pings for c in others]
                event = None
                while not isinstance(event, CloseConnection):
                    event = await silent.next_event()
                closed_at = trio.current_time()
                measured["lower"] = closed_at - sent_at
                measured["upper"] = closed_at - accepted_at
                assert event.code == 1011
                assert event.reason == "heartbeat timeout"
                assert silent.pings >= 2  # it was pinged, and said nothing
                # The others were pinged meanwhile and are still open.
                await trio.sleep(2 * config.heartbeat_interval)
                assert all(c.pings > p for c, p in zip(others, pings_before, strict=True))
                assert server.stats().connections == 50
                readers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    run(body)
    assert measured["lower"] >= config.heartbeat_timeout
    assert measured["upper"] <= config.heartbeat_timeout + 0.5
    assert len(timeouts) == 1


def test_timer_rearms_when_a_sooner_deadline_appears() -> None:
    """A long-idle server (timer asleep until far away) still pings a new connection on time."""
    config = ServerConfig(heartbeat_interval=0.3, heartbeat_timeout=10, close_timeout=0.3,
                          request_timeout=60)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, config)
            await trio.sleep(0.1)
            client = await RawClient.connect(server.port)
            started = trio.current_time()
            while client.pings == 0:
                await client.next_event()
            assert trio.current_time() - started < config.heartbeat_interval + 0.2
            nursery.cancel_scope.cancel()

    run(body)
