"""Backpressure under trio: a subscriber that stops reading is closed 1008 ``slow consumer`` while
the others keep receiving every message in order (PROTOCOL.md, Limits and failures)."""

from __future__ import annotations

import json

import trio
from trio_helpers import RawClient, run, start

from tank_core import ServerConfig, SlowConsumerClosed


def test_reader_that_stops_reading_is_closed_1008_others_keep_receiving() -> None:
    config = ServerConfig(max_outbox_bytes=256 * 1024, close_timeout=5.0)
    slow_events: list[SlowConsumerClosed] = []
    payload = "x" * 16_000
    outcome: dict[str, object] = {}

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(
                nursery,
                config,
                on_event=lambda e: slow_events.append(e) if isinstance(e, SlowConsumerClosed) else None,
            )
            slow = await RawClient.connect(server.port, "/ws?user_id=slow", rcvbuf=4096)
            fast = [await RawClient.connect(server.port, f"/ws?user_id=fast{i}") for i in range(3)]
            for client in (slow, *fast):
                await client.recv_text()
                await client.send_text("sub:feed")
            with trio.fail_after(5):
                while server.stats().topics.get("feed") != 4:
                    await trio.sleep(0.01)

            received = [0] * len(fast)
            progress = trio.Condition()

            async def read_all(i: int, client: RawClient) -> None:
                while True:
                    text = await client.recv_text()
                    if text == "heartbeat":
                        continue
                    message = json.loads(text)
                    assert message["data"] == f"{received[i]}:{payload}"  # every one, in order
                    received[i] += 1
                    async with progress:
                        progress.notify_all()

            async with trio.open_nursery() as readers:
                for i, client in enumerate(fast):
                    readers.start_soon(read_all, i, client)
                published = 0
                while not slow_events and published < 5000:
                    delivered = server.publish("feed", f"{published}:{payload}")
                    assert delivered >= 3
                    published += 1
                    async with progress:
                        while min(received) < published:  # the fast ones keep up, unhindered
                            await progress.wait()
                outcome["published"] = published
                assert slow_events, "the stalled subscriber was never closed"
                assert slow_events[0].user_id == "slow"
                assert server.stats().slow_consumer_closes == 1
                assert server.stats().topics.get("feed") == 3
                # Keep publishing: the others are not delayed by the closed one.
                for _ in range(20):
                    assert server.publish("feed", f"{published}:{payload}") == 3
                    published += 1
                    with trio.fail_after(5):
                        async with progress:
                            while min(received) < published:
                                await progress.wait()
                readers.cancel_scope.cancel()
            for client in fast:
                await client.aclose()

            # The stalled reader reads again: whatever was in flight, then Close 1008.
            with trio.fail_after(10):
                close = await slow.recv_until_close()
            outcome["code"] = close.code
            outcome["reason"] = close.reason
            outcome["slow_received"] = len(slow.messages)
            await slow.send_close(close.code)
            nursery.cancel_scope.cancel()

    run(body, timeout=60)
    assert outcome["code"] == 1008
    assert outcome["reason"] == "slow consumer"
    assert isinstance(outcome["published"], int) and isinstance(outcome["slow_received"], int)
    assert outcome["slow_received"] < outcome["published"]  # the pending rest was discarded
