"""The contract, part 3: the application never breaks nor slows the protocol. A hook that raises
is logged; coroutine hooks that fall behind lose events, counted in ``dropped_events``."""

from __future__ import annotations

import json
import logging

import pytest
from contract_support import RawPeer, Serve, eventually, masked_frame, recv_text, ws_client

from tank_core import Limits, ServerConfig
from tank_core.notifications import MessageReceived, Notification


def test_a_hook_that_raises_is_logged_and_breaks_nothing(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[str] = []

    def on_message(event: MessageReceived) -> None:
        received.append(event.text)
        raise RuntimeError("application bug")

    async def on_event(event: Notification) -> None:
        raise ValueError("async application bug")

    with caplog.at_level(logging.ERROR, logger="tank"):
        srv = serve(on_message=on_message, on_event=on_event)
        a, b = ws_client(srv.url + "?user_id=a"), ws_client(srv.url + "?user_id=b")
        recv_text(a)
        recv_text(b)
        a.send("one")
        assert recv_text(b) == "one"  # relayed although the hook raised
        a.send("two")
        assert recv_text(b) == "two"
        b.send("sub:x")
        eventually(lambda: srv.stats().topics.get("x") == 1)
        assert srv.call(lambda s: s.publish("x", "still works")) == 1
        assert json.loads(recv_text(b))["data"] == "still works"
        a.close()
        b.close()
        srv.stop()
    assert received == ["one", "two"]
    messages = [r.getMessage() for r in caplog.records if r.name == "tank"]
    assert any("on_message" in m and "MessageReceived" in m for m in messages)
    assert any("on_event" in m for m in messages)
    assert "application bug" in caplog.text
    assert "async application bug" in caplog.text


@pytest.mark.parametrize(("queue_size", "burst"), [(4, 30), (None, 1030)], ids=["4", "default-1024"])
def test_coroutine_hooks_that_fall_behind_drop_and_count_events(
    serve: Serve, queue_size: int | None, burst: int
) -> None:
    handled: list[str] = []

    async def on_event(event: Notification) -> None:
        await srv.nap(0)
        handled.append(getattr(event, "topic", type(event).__name__))

    options = {} if queue_size is None else {"hook_queue_size": queue_size}
    # More topics in one burst than the default limits let a connection hold or send at once, and
    # a turn budget that handles the whole burst in one batch.
    unlimited = Limits(max_topics_per_connection=None, max_frames_per_second=None,
                       input_budget=1 << 20)
    srv = serve(ServerConfig(limits=unlimited), on_event=on_event, **options)
    queued = queue_size or 1024
    peer = RawPeer.open(srv.port)
    peer.recv_text()
    eventually(lambda: handled == ["ClientConnected"])
    # A burst of subscriptions in one write: one read, one batch, more events at once than the
    # queue holds.
    peer.send(b"".join(masked_frame(0x1, f"sub:t{i}".encode()) for i in range(burst)))
    eventually(lambda: len(srv.stats().topics) == burst)
    # The protocol did not wait for the application.
    last = f"t{burst - 1}"
    assert srv.call(lambda s: s.publish(last, "x")) == 1
    assert json.loads(peer.recv_text()) == {"topic": last, "data": "x"}
    eventually(lambda: len(handled) >= 1 + queued)
    assert handled == ["ClientConnected", *(f"t{i}" for i in range(queued))]
    assert srv.call(lambda s: s.dropped_events) == burst - queued
    peer.close()
