"""``tank_trio.connect`` (issue 4) over real sockets on 127.0.0.1, against the real trio server.

Topic messages arrive once per callback, stream and ``on_message``; a server restart on the same
port is followed by one reconnect and exactly one ``sub:`` per held topic; ``on_heartbeat`` follows
the server's interval; ``send()`` while disconnected is queued and written in order after the
reconnect; a server frozen with SIGSTOP is detected within ``heartbeat_timeout`` + 0.5 s of the
last sign of life and the client comes back after SIGCONT with working subscriptions. The client
runs one timer task, and a cancelled block still closes with 1000 and lets the cancellation through.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_helpers import FAST, count_tasks, run, start

import tank_core.client.session as client_session
import tank_trio
from tank_core import ConfigError, LocalProtocolError, ServerConfig
from tank_core.actions import UpgradeRequest
from tank_core.client import MessageArrived
from tank_core.notifications import ClientDisconnected, MessageReceived, TopicSubscribed
from tank_trio import Client

#: Client settings for tests: quick retries, quick liveness checks.
QUICK: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.0,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 2.0,
}
ROOT = Path(__file__).resolve().parents[2]


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``check()`` is true, or fail after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    while not check():
        if trio.current_time() > deadline:
            raise AssertionError("condition not reached in time")
        await trio.sleep(step)


class Restartable:
    """A trio server that can be shut down and started again on the same port."""

    def __init__(self, nursery: trio.Nursery, config: ServerConfig = FAST, **hooks: Any) -> None:
        self.nursery = nursery
        self.config = config
        self.hooks = hooks
        self.port = 0
        self.server: tank_trio.Server | None = None

    async def start(self) -> tank_trio.Server:
        self.server = await tank_trio.serve_in(
            self.nursery, self.config, "127.0.0.1", self.port, **self.hooks
        )
        self.port = self.server.port
        return self.server

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.shutdown()
        self.server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _subscriptions(events: list[Any]) -> Counter[str]:
    return Counter(e.topic for e in events if isinstance(e, TopicSubscribed))


# ---------------------------------------------------------------------- basics


def test_subscribe_and_publish_arrive_once_per_consumer() -> None:
    async def body() -> None:
        events: list[Any] = []
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST, on_event=events.append)
            seen: list[MessageArrived] = []
            by_callback: list[tuple[object, MessageArrived]] = []
            async with tank_trio.connect(server.url, user_id="alice", on_message=seen.append,
                                         **QUICK) as client:
                assert client.connected and client.user_id == "alice"
                # One timer task; one writer (the connection's task) and one reader.
                assert count_tasks("tank client timer") == 1
                assert count_tasks("tank client writer") == 1
                assert count_tasks("tank client reader") == 1
                assert client.timer is not None
                assert client.timer.deadline == client.core.next_deadline()

                await client.subscribe("news", lambda data, m: by_callback.append((data, m)))
                stream = client.messages("news")  # same topic: no second sub:
                await eventually(lambda: server.stats().topics.get("news") == 1)
                assert server.publish("news", "hello") == 1
                with trio.fail_after(2):
                    message = await stream.__anext__()
                await trio.sleep(0.3)  # room for duplicates
                assert message.topic == "news" and message.data == "hello"
                assert message.text == '{"topic":"news","data":"hello"}'
                assert [(d, m.topic) for d, m in by_callback] == [("hello", "news")]
                assert [m.data for m in seen if m.topic == "news"] == ["hello"]
                assert _subscriptions(events) == {"news": 1}
                assert client.topics == ("news",)

                await client.unsubscribe("news")
                await eventually(lambda: "news" not in server.stats().topics)
                assert server.publish("news", "gone") == 0
                with pytest.raises(StopAsyncIteration), trio.fail_after(1):
                    await stream.__anext__()
                assert client.latency is not None and 0 <= client.latency < 0.5
                assert count_tasks("tank client timer") == 1
            assert count_tasks("tank client") == 0  # every task of the client has ended
            nursery.cancel_scope.cancel()

    run(body)


def test_leaving_the_block_closes_for_good_with_1000() -> None:
    async def body() -> None:
        gone: list[ClientDisconnected] = []
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST, on_disconnect=gone.append)
            closes: list[tuple[int, str, bool]] = []
            holder: list[Client] = []

            def on_close(code: int, reason: str) -> None:
                closes.append((code, reason, holder[0].closed))

            async with tank_trio.connect(server.url, on_close=on_close, **QUICK) as client:
                holder.append(client)
                stream = client.messages("t")
            assert client.closed and not client.connected
            assert client.timer is None
            assert closes == [(1000, "", True)]
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            with pytest.raises(LocalProtocolError):
                await client.send("late")
            with pytest.raises(LocalProtocolError):
                await client.subscribe("late")
            with pytest.raises(LocalProtocolError):
                client.messages("late")
            await client.close()  # idempotent
            await client.wait_closed()
            await eventually(lambda: len(gone) == 1)
            assert gone[0].code == 1000
            nursery.cancel_scope.cancel()

    run(body)


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
            port = _closed_port()
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


def test_async_callbacks_start_in_order_and_their_exceptions_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        got: list[object] = []
        started: list[object] = []

        async def on_message(message: MessageArrived) -> None:
            await trio.sleep(0)
            if message.topic == "news":
                raise RuntimeError("boom in on_message")

        def broken(data: object, message: MessageArrived) -> None:
            raise ValueError("boom in a topic callback")

        async def topic_callback(data: object, message: MessageArrived) -> None:
            started.append(data)
            await trio.sleep(0.01)
            got.append(data)

        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST)
            async with tank_trio.connect(server.url, on_message=on_message, **QUICK) as client:
                await client.subscribe("news", broken)
                await client.subscribe("news", topic_callback)  # replaces `broken`
                await client.subscribe("other", broken)
                await eventually(lambda: server.stats().topics == {"news": 1, "other": 1})
                server.publish("other", "x")
                for i in range(20):
                    server.publish("news", str(i))
                await eventually(lambda: len(got) == 20)
                assert started == [str(i) for i in range(20)]  # tasks start in call order
                assert client.connected
            nursery.cancel_scope.cancel()

        text = caplog.text
        assert "boom in on_message" in text and "boom in a topic callback" in text
        assert all(r.name == "tank" for r in caplog.records if r.levelno >= logging.ERROR)

    with caplog.at_level(logging.ERROR, logger="tank"):
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


def test_a_full_stream_drops_and_counts_without_touching_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST)
            everything: list[object] = []
            async with tank_trio.connect(server.url, **QUICK) as client:
                await client.subscribe("news", lambda data, m: everything.append(data))
                small = client.messages("news", max_queued=2)
                roomy = client.messages("news")
                await eventually(lambda: server.stats().topics.get("news") == 1)
                for i in range(5):
                    server.publish("news", str(i))
                await eventually(lambda: len(everything) == 5)
                assert small.dropped == 3 and roomy.dropped == 0
                assert [(await small.__anext__()).data for _ in range(2)] == ["0", "1"]
                assert [(await roomy.__anext__()).data for _ in range(5)] == list("01234")
                async with small:  # leaving it is aclose(): the stream ends, the topic stays
                    pass
                server.publish("news", "5")
                await eventually(lambda: len(everything) == 6)
                with pytest.raises(StopAsyncIteration):
                    await small.__anext__()
                assert (await roomy.__anext__()).data == "5"
                assert client.topics == ("news",)
                with pytest.raises(LocalProtocolError):
                    client.messages("news", max_queued=0)
            nursery.cancel_scope.cancel()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.message]
        assert len(warnings) == 1

    with caplog.at_level(logging.WARNING, logger="tank"):
        run(body)


def test_bad_settings_raise_config_error_at_once() -> None:
    with pytest.raises(ConfigError):
        tank_trio.connect("http://127.0.0.1:1/ws")
    with pytest.raises(ConfigError):
        tank_trio.connect("ws://127.0.0.1:1/ws", heartbeat_interval=5, heartbeat_timeout=5)


# ---------------------------------------------------------------------- first connect


def test_first_connect_refused_without_reconnect_is_a_connection_error() -> None:
    async def body() -> None:
        port = _closed_port()
        closes: list[tuple[int, str]] = []
        began = trio.current_time()
        with pytest.raises(ConnectionError) as info:
            async with tank_trio.connect(f"ws://127.0.0.1:{port}/ws", reconnect=False,
                                         on_close=lambda c, r: closes.append((c, r))):
                raise AssertionError("not reached")
        assert trio.current_time() - began < 1
        message = str(info.value)
        assert message.startswith(f"tank: cannot connect to ws://127.0.0.1:{port}/ws: ")
        assert "ConnectionRefusedError" in message
        assert len(closes) == 1 and closes[0][0] == 1006

    run(body)


def test_first_connect_with_reconnect_gives_up_after_connect_timeout() -> None:
    async def body() -> None:
        port = _closed_port()
        closes: list[tuple[int, str]] = []
        began = trio.current_time()
        with pytest.raises(TimeoutError) as info:
            async with tank_trio.connect(
                f"ws://127.0.0.1:{port}/ws", connect_timeout=0.6, reconnect_initial_delay=0.05,
                reconnect_max_delay=0.1, on_close=lambda c, r: closes.append((c, r)),
            ):
                raise AssertionError("not reached")
        took = trio.current_time() - began
        assert 0.55 <= took < 1.5, took
        assert "within 0.6 s" in str(info.value) and "ConnectionRefusedError" in str(info.value)
        assert len(closes) >= 3  # several attempts, each reported
        assert closes[-1] == (1000, "")  # then closed for good

    run(body)


def test_first_connect_succeeds_once_the_server_comes_up() -> None:
    async def body() -> None:
        reconnects: list[int] = []
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery)
            server.port = _closed_port()

            async def later() -> None:
                await trio.sleep(0.3)
                await server.start()

            nursery.start_soon(later)
            async with tank_trio.connect(server.url, on_reconnect=reconnects.append,
                                         **QUICK) as client:
                assert client.connected
                assert reconnects == []  # the first open is not a reconnect
            await server.stop()

    run(body)


# ---------------------------------------------------------------------- reconnect


def test_server_restart_on_the_same_port_resubscribes_once_and_delivers_once() -> None:
    async def body() -> None:
        events: list[Any] = []
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery, on_event=events.append)
            first = await server.start()
            got: dict[str, list[object]] = {"a": [], "b": []}
            streamed: list[object] = []
            reconnects: list[int] = []
            reopened = trio.Event()
            closes: list[tuple[int, str]] = []

            def on_reconnect(attempt: int) -> None:
                reconnects.append(attempt)
                reopened.set()

            async with tank_trio.connect(server.url, on_reconnect=on_reconnect,
                                         on_close=lambda c, r: closes.append((c, r)),
                                         **QUICK) as client:
                await client.subscribe("a", lambda d, m: got["a"].append(d))
                await client.subscribe("b", lambda d, m: got["b"].append(d))
                stream = client.messages("a")
                await eventually(lambda: first.stats().topics == {"a": 1, "b": 1})

                await server.stop()
                await eventually(lambda: bool(closes))
                assert closes[0][0] == 1001
                await trio.sleep(0.3)  # a few refused attempts
                assert not client.connected and len(closes) >= 2
                events.clear()
                restarted_at = trio.current_time()
                second = await server.start()
                with trio.fail_after(3):
                    await reopened.wait()
                back_after = trio.current_time() - restarted_at
                await eventually(lambda: second.stats().topics == {"a": 1, "b": 1})
                await trio.sleep(0.3)  # room for a second sub:
                assert _subscriptions(events) == {"a": 1, "b": 1}
                assert len(reconnects) == 1 and reconnects[0] >= 1
                for i in range(3):
                    assert second.publish("a", f"x{i}") == 1 and second.publish("b", f"y{i}") == 1
                with trio.fail_after(2):
                    for _ in range(3):
                        streamed.append((await stream.__anext__()).data)
                await trio.sleep(0.3)  # room for duplicates
                assert got == {"a": ["x0", "x1", "x2"], "b": ["y0", "y1", "y2"]}
                assert streamed == ["x0", "x1", "x2"]
                assert second.stats().connections == 1
                assert count_tasks("tank client reader") == 1
                print(f"\ntrio restart: reconnected {back_after * 1000:.0f} ms after the server came "
                      f"back (attempt {reconnects[0]}, {len(closes) - 1} refused attempts while down)")
            await server.stop()

    run(body)


def test_send_while_disconnected_is_queued_then_relayed_in_order_after_reconnect() -> None:
    async def body() -> None:
        received: list[str] = []
        receiver_in = trio.Event()

        async def authenticate(request: UpgradeRequest) -> bool:
            # Hold the sender's upgrade until the receiver is in, so the relay has someone to reach.
            if request.user_id == "sender":
                await receiver_in.wait()
            return True

        def on_server_message(event: MessageReceived) -> None:
            received.append(event.text)

        async with trio.open_nursery() as nursery:
            server = Restartable(nursery, authenticate=authenticate, on_message=on_server_message)
            receiver_in.set()
            await server.start()
            relayed: list[str] = []
            async with tank_trio.connect(server.url, user_id="sender", send_queue_limit=3,
                                         **QUICK) as sender:
                await sender.send("live")
                await eventually(lambda: received == ["live"])
                await server.stop()
                await eventually(lambda: not sender.connected)
                receiver_in = trio.Event()
                for text in ("one", "two", "three"):
                    await sender.send(text)  # queued, no error
                assert sender.core.queued == 3
                with pytest.raises(LocalProtocolError, match="send_queue_limit"):
                    await sender.send("four")
                second = await server.start()
                async with tank_trio.connect(
                    server.url, user_id="receiver",
                    on_message=lambda m: relayed.append(m.text) if m.topic is None else None,
                    **QUICK,
                ):
                    receiver_in.set()
                    await eventually(lambda: relayed[-3:] == ["one", "two", "three"], timeout=5)
                    await trio.sleep(0.2)
                    assert relayed == ["one", "two", "three"]
                    assert received == ["live", "one", "two", "three"]
                    assert sender.core.queued == 0 and second.stats().connections == 2
            await server.stop()

    run(body)


def test_without_reconnect_a_lost_connection_closes_for_good() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery)
            await server.start()
            closes: list[tuple[int, str]] = []
            async with tank_trio.connect(server.url, reconnect=False,
                                         on_close=lambda c, r: closes.append((c, r))) as client:
                stream = client.messages("t")
                await server.stop()
                with trio.fail_after(2):
                    await client.wait_closed()
                assert client.closed and closes[0][0] == 1001
                with pytest.raises(StopAsyncIteration):
                    await stream.__anext__()
                with pytest.raises(LocalProtocolError):
                    await client.send("x")
            assert len(closes) == 1

    run(body)


# ---------------------------------------------------------------------- heartbeat


def test_on_heartbeat_follows_the_servers_interval() -> None:
    async def body() -> None:
        beats: list[float] = []
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST)
            async with tank_trio.connect(server.url,
                                         on_heartbeat=lambda: beats.append(trio.current_time())):
                await trio.sleep(1.5)
            nursery.cancel_scope.cancel()
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert len(beats) >= 5, beats
        mean = sum(gaps) / len(gaps)
        print(f"\ntrio on_heartbeat: {len(beats)} in 1.5 s, gaps mean {mean * 1000:.0f} ms, "
              f"min {min(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms (server interval 200 ms)")
        assert 0.17 <= mean <= 0.25
        assert min(gaps) >= 0.1 and max(gaps) <= 0.35

    run(body)


def test_client_heartbeats_are_proof_of_life_and_never_relayed() -> None:
    async def body() -> None:
        seen: list[MessageReceived] = []
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST, on_message=seen.append)
            async with tank_trio.connect(server.url, heartbeat_interval=0.05,
                                         heartbeat_timeout=1.0) as client:
                await eventually(
                    lambda: server.stats().pongs_received >= 1 and client.latency is not None
                )
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert seen == []

    run(body)


def _http_publish(port: int, topic: str, data: str) -> int:
    body = json.dumps({"topic": topic, "data": data}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.loads(response.read())["delivered"])


def _http_topics(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as response:
        topics: dict[str, int] = json.loads(response.read())["topics"]
        return topics


async def _first_line(stream: trio.abc.ReceiveStream) -> str:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"the server exited before announcing itself: {buffer!r}")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_frozen_server_is_detected_and_the_client_comes_back_after_sigcont() -> None:
    timeout = 1.0
    stopped_for = 2.0

    async def body() -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANK_")}
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tank_cli", "serve", "--backend", "trio", "--port", "0",
             "--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6", "--log-level", "warning"],
            stdout=subprocess.PIPE, cwd=ROOT, env=env,
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(10):
                line = await _first_line(proc.stdout)
            assert line.startswith("tank: serving ws://") and "(backend trio)" in line, line
            url = line.split()[2]
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            timeouts: list[tuple[float, float]] = []
            reconnects: list[tuple[float, int]] = []
            got: list[object] = []
            beats: list[float] = []
            async with tank_trio.connect(
                url, heartbeat_interval=0.2, heartbeat_timeout=timeout,
                reconnect_initial_delay=0.1, reconnect_max_delay=0.3, connect_timeout=0.5,
                on_heartbeat=lambda: beats.append(trio.current_time()),
                on_heartbeat_timeout=lambda s: timeouts.append((trio.current_time(), s)),
                on_reconnect=lambda a: reconnects.append((trio.current_time(), a)),
            ) as client:
                await client.subscribe("news", lambda data, m: got.append(data))
                await eventually(lambda: len(beats) >= 2)
                assert await trio.to_thread.run_sync(_http_publish, port, "news", "before") == 1
                await eventually(lambda: got == ["before"])

                await trio.sleep(0.13)  # freeze between two heartbeats, not right after a message
                frozen_at = trio.current_time()
                proc.send_signal(signal.SIGSTOP)
                await trio.sleep(stopped_for)
                assert len(timeouts) == 1, timeouts
                last_beat = max(b for b in beats if b <= frozen_at)
                thawed_at = trio.current_time()
                proc.send_signal(signal.SIGCONT)
                fired_at, silent_for = timeouts[0]
                last_sign = fired_at - silent_for  # what the client last heard (any frame)
                await eventually(lambda: bool(reconnects) and client.connected, timeout=5)
                back_at = reconnects[0][0]
                await eventually(lambda: _http_topics(port) == {"news": 1}, timeout=5)
                assert await trio.to_thread.run_sync(_http_publish, port, "news", "after") == 1
                await eventually(lambda: got == ["before", "after"])
                await trio.sleep(0.3)  # room for duplicates
                assert got == ["before", "after"]
                assert len(reconnects) == 1
                print(f"\ntrio frozen server: on_heartbeat_timeout {fired_at - last_sign:.3f} s after "
                      f"the last sign of life (silent_for {silent_for:.3f} s, heartbeat_timeout "
                      f"{timeout} s; last text heartbeat {fired_at - last_beat:.3f} s before, "
                      f"SIGSTOP {fired_at - frozen_at:.3f} s before); back {back_at - thawed_at:.3f} s "
                      f"after SIGCONT (attempt {reconnects[0][1]}); messages: {got}")
                assert timeout - 1e-9 <= silent_for <= timeout + 0.5  # (float rounding at the deadline)
                # The text heartbeat is one of the signs of life (callback times lag the core's
                # clock readings by a scheduling step, hence the slack).
                assert last_beat <= last_sign + 0.05, (last_beat, last_sign)
                assert fired_at - last_beat <= timeout + 0.5
                assert timeout - 0.3 <= fired_at - frozen_at <= timeout + 0.5
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    run(body, timeout=30)


# ---------------------------------------------------------------------- TLS


def _self_signed(directory: str) -> tuple[str, str] | None:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
             cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


def test_wss_goes_through_tls() -> None:
    with tempfile.TemporaryDirectory() as directory:
        pair = _self_signed(directory)
        assert pair is not None, "openssl (Debian's, on every machine here) made no certificate"
        cert, key = pair
        server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_side.load_cert_chain(cert, key)
        client_side = ssl.create_default_context(cafile=cert)

        async def body() -> None:
            async with trio.open_nursery() as nursery:
                server = await start(nursery, FAST)

                async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                    try:
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    finally:
                        await trio.aclose_forcefully(sink)

                async def terminate(tls: trio.SSLStream[trio.SocketStream]) -> None:
                    upstream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    async with trio.open_nursery() as pipes:
                        pipes.start_soon(pipe, tls, upstream)
                        pipes.start_soon(pipe, upstream, tls)

                listeners = await nursery.start(
                    functools.partial(trio.serve_ssl_over_tcp, terminate, 0, server_side,
                                      host="127.0.0.1")
                )
                port = listeners[0].transport_listener.socket.getsockname()[1]
                got: list[object] = []
                async with tank_trio.connect(f"wss://127.0.0.1:{port}/ws", ssl_context=client_side,
                                             **QUICK) as client:
                    await client.subscribe("news", lambda data, m: got.append(data))
                    await eventually(lambda: server.stats().topics.get("news") == 1)
                    server.publish("news", "secret")
                    await eventually(lambda: got == ["secret"])
                # The default context does not trust a self-signed certificate.
                with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                    async with tank_trio.connect(f"wss://127.0.0.1:{port}/ws", reconnect=False):
                        pass
                nursery.cancel_scope.cancel()

        run(body)


# ---------------------------------------------------------------------- failure of the core


def test_a_core_failure_closes_the_client_and_leaving_the_block_reraises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(Exception):
        pass

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, FAST)
            with pytest.raises(Boom):
                async with tank_trio.connect(server.url, **QUICK) as client:

                    def broken(event: object) -> Any:
                        raise Boom("core bug")

                    client.core.receive = broken  # type: ignore[method-assign]
                    server.broadcast("anything")
                    with trio.fail_after(2):
                        await client.wait_closed()
                    assert client.closed and not client.connected and client.timer is None
                    with pytest.raises(LocalProtocolError, match="failed"):
                        await client.send("x")
            await eventually(lambda: server.stats().connections == 0)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="tank"):
        run(body)
    assert "tank client failed" in caplog.text
