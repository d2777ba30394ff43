"""What is particular to the trio server (the behaviour every transport shares is in
tests/contract): its tasks (one timer for the whole server, a reader and a writer per socket),
``wait_closed``, and a cancelled caller seeing a cancellation rather than an exception group."""

from __future__ import annotations

import trio
from trio_helpers import FAST, RawClient, count_tasks, run, start

import tank_trio


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


def test_wait_closed_returns_after_shutdown() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery)
            order: list[str] = []

            async def waiter() -> None:
                await server.wait_closed()
                order.append("closed")

            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            assert order == []
            await server.shutdown()
            await trio.sleep(0.05)
            assert order == ["closed"]

    run(body)


def test_cancelled_caller_sees_cancellation_not_a_group() -> None:
    async def body() -> None:
        with trio.move_on_after(0.3) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(tank_trio.serve, None, "127.0.0.1", 0)
        assert scope.cancelled_caught

    run(body)
