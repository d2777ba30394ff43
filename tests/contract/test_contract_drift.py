"""The three drifts of issue 9, on every transport: behaviours the asyncio and trio adapters once
disagreed on, now the session's (``tank_core.ServerSession``) and so the same everywhere.

1. a verdict that arrives late and that the core refuses is logged, and the server keeps serving
   (asyncio used to stop the whole server);
2. a timer that fires a hair early (within ``EARLY_WAKE_SLACK``) ticks at its armed deadline
   (asyncio used to re-arm), and one that fires well before it only re-arms;
3. an object with an async ``__call__`` is a coroutine hook: awaited through the bounded queue
   (only asyncio did so).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from contract_support import RawPeer, Serve, eventually, masked_frame, recv_text, ws_client

from tank_core import ServerConfig
from tank_core.notifications import MessageReceived, Notification
from tank_core.server.session import EARLY_WAKE_SLACK


def test_drift1_a_late_verdict_the_core_refuses_is_logged_and_the_server_keeps_serving(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    srv = serve()
    a = ws_client(srv.url + "?user_id=a")
    recv_text(a)
    (open_id,) = srv.call(lambda s: s.core.engine.open_connections())
    with caplog.at_level(logging.WARNING, logger="tank"):
        # Verdicts for a connection that is long open: the core refuses them (LocalProtocolError).
        srv.call(lambda s: s._verdict(open_id, (True, 0, "")))
        srv.call(lambda s: s._verdict(open_id, (False, 401, "Unauthorized")))
        # And one for a connection that is gone: ignored.
        srv.call(lambda s: s._verdict(open_id + 1000, (True, 0, "")))
    late = [r for r in caplog.records if r.name == "tank" and "came too late" in r.getMessage()]
    assert len(late) == 2
    assert all(r.levelno == logging.WARNING for r in late)
    assert srv.call(lambda s: (s.failure, s.closing)) == (None, False)
    # Still serving: the open connection, and new ones.
    a.send("sub:t")
    eventually(lambda: srv.stats().topics.get("t") == 1)
    assert srv.call(lambda s: s.publish("t", "fine")) == 1
    assert json.loads(recv_text(a)) == {"topic": "t", "data": "fine"}
    with ws_client(srv.url + "?user_id=b") as b:
        recv_text(b)
        assert srv.stats().connections == 2
    a.close()
    srv.stop()  # no failure to re-raise


def test_drift2_a_timer_that_fires_a_hair_early_ticks_at_its_armed_deadline(serve: Serve) -> None:
    config = ServerConfig(heartbeat_interval=30, heartbeat_timeout=60, close_timeout=0.3,
                          request_timeout=0.4)
    srv = serve(config)
    idle = RawPeer.connect(srv.port)  # never sends a byte: request_timeout is its one deadline
    eventually(lambda: srv.call(lambda s: s._armed is not None and s._armed == s.core.next_deadline()))

    def far_too_early(s: Any) -> tuple[float, float, float | None, float | None]:
        armed, now = s._armed, s._clock()
        s._timer_fired()
        return armed, now, s._armed, s.core.next_deadline()

    armed, now, rearmed, deadline = srv.call(far_too_early)
    assert armed - now > 10 * EARLY_WAKE_SLACK
    assert rearmed == armed and deadline == armed  # nothing ticked: only re-armed

    def a_hair_early(s: Any) -> tuple[float, float, float | None]:
        armed, real_now = s._armed, s._clock()
        s._clock = lambda: armed - EARLY_WAKE_SLACK / 2  # the wake-up reads a hair early
        try:
            s._timer_fired()
        finally:
            del s._clock  # the adapter's own clock again
        return armed, real_now, s.core.next_deadline()

    armed, real_now, deadline = srv.call(a_hair_early)
    assert real_now < armed  # (the real timer had not fired yet)
    # Dealt with as if on time: request_timeout closed it at ``armed``, and what is due next is
    # its close_timeout counted from the armed deadline, not from the early wake.
    assert deadline == pytest.approx(armed + config.close_timeout, abs=1e-9)
    assert idle.at_eof(timeout=2)
    idle.close()
    assert srv.call(lambda s: s.failure) is None


def test_drift3_an_object_with_an_async_call_is_awaited_as_a_coroutine_hook(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.seen: list[str] = []

        async def __call__(self, event: Notification) -> None:
            await srv.nap(0)
            self.seen.append(getattr(event, "topic", type(event).__name__))

    class Echo:
        async def __call__(self, event: MessageReceived, server: Any) -> None:
            await srv.nap(0)
            server.publish("echo", event.text.upper())

    class Faulty:
        async def __call__(self, event: Notification) -> None:
            raise RuntimeError("application bug")

        def __repr__(self) -> str:
            return "<Faulty hook>"

    recorder = Recorder()
    with caplog.at_level(logging.ERROR, logger="tank"):
        srv = serve(on_event=recorder, on_message=Echo(), on_connect=Faulty(), hook_queue_size=2)
        peer = RawPeer.open(srv.port)
        peer.recv_text()
        eventually(lambda: recorder.seen == ["ClientConnected"])
    # Known as a coroutine hook, so logged under its own name (a plain hook's awaitable is not).
    assert any(r.getMessage() == "hook <Faulty hook> raised on ClientConnected" for r in caplog.records)
    peer.send_text("sub:echo")
    eventually(lambda: recorder.seen == ["ClientConnected", "echo"])
    peer.send_text("hi")  # awaited with the server, as a two-parameter hook
    assert json.loads(peer.recv_text()) == {"topic": "echo", "data": "HI"}
    eventually(lambda: len(recorder.seen) >= 3)
    # Queued, not run inline: a burst of ten events for a queue of two drops eight.
    peer.send(b"".join(masked_frame(0x1, f"sub:t{i}".encode()) for i in range(10)))
    eventually(lambda: len(srv.stats().topics) == 11)
    eventually(lambda: len(recorder.seen) >= 5)
    assert recorder.seen == ["ClientConnected", "echo", "MessageReceived", "t0", "t1"]
    assert srv.call(lambda s: s.dropped_events) == 8
    peer.close()
