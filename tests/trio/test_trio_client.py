"""What ``tank_trio.connect`` adds to the client contract (tests/client_contract, run on both
backends): trio's cancellation semantics. A cancelled block still closes with 1000 and lets the
cancellation through (not as an ExceptionGroup), a cancelled entry closes the client, and closing
waits for async callbacks, then cancels them with ``trio.Cancelled``.
"""

from __future__ import annotations

import logging

import pytest
import trio
from client_backends import TrioBackend
from client_support import QUICK, closed_port
from trio_helpers import FAST, count_tasks, run, start

import tank_core.client.session as client_session
import tank_trio
from tank_core.client import MessageArrived
from tank_core.notifications import ClientDisconnected

eventually = TrioBackend().eventually


def test_a_cancelled_block_closes_with_1000_and_exceptions_pass_unchanged() -> None:
    async def body() -> None:
        gone: list[ClientDisconnected] = []
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST, on_disconnect=gone.append)
            # A cancellation of the block: the closing handshake still happens, then the
            # cancellation reaches its scope (not an ExceptionGroup on the way).
            with trio.move_on_after(0.3) as scope:
                async with tank_trio.connect(server.url, **QUICK) as client:
                    await trio.sleep_forever()
            assert scope.cancelled_caught and client.closed
            await eventually(lambda: len(gone) == 1)
            assert gone[0].code == 1000

            # An exception from the body comes out as it is.
            with pytest.raises(KeyError) as info:
                async with tank_trio.connect(server.url, **QUICK):
                    raise KeyError("mine")
            assert info.value.args == ("mine",)

            # A cancellation while entering (the server is not there yet) closes the client too.
            port = closed_port()
            closes: list[tuple[int, str]] = []
            with trio.move_on_after(0.2) as scope:
                async with tank_trio.connect(f"ws://127.0.0.1:{port}/ws",
                                             on_close=lambda c, r: closes.append((c, r)), **QUICK):
                    raise AssertionError("not reached")
            assert scope.cancelled_caught and closes[-1] == (1000, "")
            await eventually(lambda: len(gone) == 2)
            assert count_tasks("tank client") == 0
            nursery.cancel_scope.cancel()

    run(body)

def test_close_waits_for_async_callbacks_then_cancels_them(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_session, "CALLBACK_GRACE", 0.3)

    async def body() -> None:
        finished: list[str] = []
        cancelled: list[str] = []

        async def quick(data: object, message: MessageArrived) -> None:
            await trio.sleep(0.1)
            finished.append("quick")

        async def stuck(data: object, message: MessageArrived) -> None:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append("stuck")
                raise

        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST)
            async with tank_trio.connect(server.url, **QUICK) as client:
                await client.subscribe("quick", quick)
                await client.subscribe("stuck", stuck)
                await eventually(lambda: len(server.stats().topics) == 2)
                server.publish("quick", "q")
                server.publish("stuck", "s")
                await trio.sleep(0.05)
                began = trio.current_time()
            took = trio.current_time() - began
            assert finished == ["quick"] and cancelled == ["stuck"]
            assert 0.3 <= took < 1.5, took
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="tank"):
        run(body)
    assert "still running at close: cancelling it" in caplog.text
