"""``tank_asyncio.connect`` and ``tank_trio.connect`` (issue 4, docs/client.md) over real sockets
on 127.0.0.1, against the real server of the same backend: one suite, run once per backend.

Topic messages arrive once per callback, stream and ``on_message``; a server restart on the same
port is followed by one reconnect and exactly one ``sub:`` per held topic; ``on_heartbeat`` follows
the server's interval; ``send()`` while disconnected is queued and written in order after the
reconnect; a server frozen with SIGSTOP is detected within ``heartbeat_timeout`` + 0.5 s of the
last sign of life and the client comes back after SIGCONT with working subscriptions.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from typing import Any

import pytest
from client_backends import Backend
from client_support import (
    FAST,
    QUICK,
    ROOT,
    Restartable,
    closed_port,
    http_publish,
    http_topics,
    self_signed,
    subscriptions,
)

from tank_core import ConfigError, LocalProtocolError
from tank_core.actions import UpgradeRequest
from tank_core.client import MessageArrived
from tank_core.notifications import ClientDisconnected, MessageReceived

# ---------------------------------------------------------------------- basics


def test_subscribe_and_publish_arrive_once_per_consumer(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        events: list[Any] = []
        server = await b.start_server(FAST, on_event=events.append)
        seen: list[MessageArrived] = []
        by_callback: list[tuple[object, MessageArrived]] = []
        async with b.connect(server.url, user_id="alice", on_message=seen.append,
                             **QUICK) as client:
            assert client.connected and client.user_id == "alice"
            b.assert_tasks_while_open(client)
            b.assert_timer_armed(client)

            await client.subscribe("news", lambda data, m: by_callback.append((data, m)))
            stream = client.messages("news")  # same topic: no second sub:
            await b.eventually(lambda: server.stats().topics.get("news") == 1)
            assert server.publish("news", "hello") == 1
            message = await b.wait_for(stream.__anext__(), 2)
            await b.sleep(0.3)  # room for duplicates
            assert message.topic == "news" and message.data == "hello"
            assert message.text == '{"topic":"news","data":"hello"}'
            assert [(d, m.topic) for d, m in by_callback] == [("hello", "news")]
            assert [m.data for m in seen if m.topic == "news"] == ["hello"]
            assert subscriptions(events) == {"news": 1}
            assert client.topics == ("news",)

            await client.unsubscribe("news")
            await b.eventually(lambda: "news" not in server.stats().topics)
            assert server.publish("news", "gone") == 0
            with pytest.raises(StopAsyncIteration):
                await b.wait_for(stream.__anext__(), 1)
            assert client.latency is not None and 0 <= client.latency < 0.5
            b.assert_tasks_while_open(client)
        b.assert_no_tasks_left()

    backend.run(body)


def test_leaving_the_block_closes_for_good_with_1000(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        gone: list[ClientDisconnected] = []
        server = await b.start_server(FAST, on_disconnect=gone.append)
        closes: list[tuple[int, str, bool]] = []
        holder: list[Any] = []

        def on_close(code: int, reason: str) -> None:
            closes.append((code, reason, holder[0].closed))

        async with b.connect(server.url, on_close=on_close, **QUICK) as client:
            holder.append(client)
            stream = client.messages("t")
            b.assert_timer_armed(client)
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
        await b.eventually(lambda: len(gone) == 1)
        assert gone[0].code == 1000

    backend.run(body)


def test_async_callbacks_start_in_order_and_their_exceptions_are_logged(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(b: Backend) -> None:
        got: list[object] = []
        started: list[object] = []

        async def on_message(message: MessageArrived) -> None:
            await b.sleep(0)
            if message.topic == "news":
                raise RuntimeError("boom in on_message")

        def broken(data: object, message: MessageArrived) -> None:
            raise ValueError("boom in a topic callback")

        async def topic_callback(data: object, message: MessageArrived) -> None:
            started.append(data)
            await b.sleep(0.01)
            got.append(data)

        server = await b.start_server(FAST)
        async with b.connect(server.url, on_message=on_message, **QUICK) as client:
            await client.subscribe("news", broken)
            await client.subscribe("news", topic_callback)  # replaces `broken`
            await client.subscribe("other", broken)
            await b.eventually(lambda: server.stats().topics == {"news": 1, "other": 1})
            server.publish("other", "x")
            for i in range(20):
                server.publish("news", str(i))
            await b.eventually(lambda: len(got) == 20)
            assert started == [str(i) for i in range(20)]  # tasks start in call order
            assert client.connected

    with caplog.at_level(logging.ERROR, logger="tank"):
        backend.run(body)
    text = caplog.text
    assert "boom in on_message" in text and "boom in a topic callback" in text
    assert all(r.name == "tank" for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_full_stream_drops_and_counts_without_touching_the_rest(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(b: Backend) -> None:
        server = await b.start_server(FAST)
        everything: list[object] = []
        async with b.connect(server.url, **QUICK) as client:
            await client.subscribe("news", lambda data, m: everything.append(data))
            small = client.messages("news", max_queued=2)
            roomy = client.messages("news")
            await b.eventually(lambda: server.stats().topics.get("news") == 1)
            for i in range(5):
                server.publish("news", str(i))
            await b.eventually(lambda: len(everything) == 5)
            assert small.dropped == 3 and roomy.dropped == 0
            assert [(await small.__anext__()).data for _ in range(2)] == ["0", "1"]
            assert [(await roomy.__anext__()).data for _ in range(5)] == list("01234")
            async with small:  # leaving it is aclose(): the stream ends, the topic stays
                pass
            await small.aclose()  # and again: nothing more happens
            server.publish("news", "5")
            await b.eventually(lambda: len(everything) == 6)
            with pytest.raises(StopAsyncIteration):
                await small.__anext__()
            assert (await roomy.__anext__()).data == "5"
            assert client.topics == ("news",)
            with pytest.raises(LocalProtocolError):
                client.messages("news", max_queued=0)

    with caplog.at_level(logging.WARNING, logger="tank"):
        backend.run(body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.message]
    assert len(warnings) == 1


def test_bad_settings_raise_config_error_at_once(backend: Backend) -> None:
    with pytest.raises(ConfigError):
        backend.connect("http://127.0.0.1:1/ws")
    with pytest.raises(ConfigError):
        backend.connect("ws://127.0.0.1:1/ws", heartbeat_interval=5, heartbeat_timeout=5)


# ---------------------------------------------------------------------- first connect


def test_first_connect_refused_without_reconnect_is_a_connection_error(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        port = closed_port()
        closes: list[tuple[int, str]] = []
        began = b.now()
        with pytest.raises(ConnectionError) as info:
            async with b.connect(f"ws://127.0.0.1:{port}/ws", reconnect=False,
                                 on_close=lambda c, r: closes.append((c, r))):
                raise AssertionError("not reached")
        assert b.now() - began < 1
        message = str(info.value)
        assert message.startswith(f"tank: cannot connect to ws://127.0.0.1:{port}/ws: ")
        assert "ConnectionRefusedError" in message
        assert len(closes) == 1 and closes[0][0] == 1006

    backend.run(body)


def test_first_connect_with_reconnect_gives_up_after_connect_timeout(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        port = closed_port()
        closes: list[tuple[int, str]] = []
        began = b.now()
        with pytest.raises(TimeoutError) as info:
            async with b.connect(
                f"ws://127.0.0.1:{port}/ws", connect_timeout=0.6, reconnect_initial_delay=0.05,
                reconnect_max_delay=0.1, on_close=lambda c, r: closes.append((c, r)),
            ):
                raise AssertionError("not reached")
        took = b.now() - began
        assert 0.55 <= took < 1.5, took
        assert "within 0.6 s" in str(info.value) and "ConnectionRefusedError" in str(info.value)
        assert len(closes) >= 3  # several attempts, each reported
        assert closes[-1] == (1000, "")  # then closed for good

    backend.run(body)


def test_first_connect_succeeds_once_the_server_comes_up(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        server = Restartable(b)
        server.port = closed_port()
        reconnects: list[int] = []

        async def later() -> None:
            await b.sleep(0.3)
            await server.start()

        b.start_soon(later)
        async with b.connect(server.url, on_reconnect=reconnects.append, **QUICK) as client:
            assert client.connected
            assert reconnects == []  # the first open is not a reconnect
        await server.stop()

    backend.run(body)


# ---------------------------------------------------------------------- reconnect


def test_server_restart_on_the_same_port_resubscribes_once_and_delivers_once(
    backend: Backend,
) -> None:
    async def body(b: Backend) -> None:
        events: list[Any] = []
        server = Restartable(b, on_event=events.append)
        first = await server.start()
        got: dict[str, list[object]] = {"a": [], "b": []}
        streamed: list[object] = []
        reconnects: list[int] = []
        reopened = b.event()
        closes: list[tuple[int, str]] = []

        def on_reconnect(attempt: int) -> None:
            reconnects.append(attempt)
            reopened.set()

        async with b.connect(server.url, on_reconnect=on_reconnect,
                             on_close=lambda c, r: closes.append((c, r)), **QUICK) as client:
            await client.subscribe("a", lambda d, m: got["a"].append(d))
            await client.subscribe("b", lambda d, m: got["b"].append(d))
            stream = client.messages("a")
            await b.eventually(lambda: first.stats().topics == {"a": 1, "b": 1})

            await server.stop()  # returns once the server's Close has reached the client
            assert closes[0][0] == 1001
            await b.sleep(0.3)  # a few refused attempts
            assert not client.connected and len(closes) >= 2
            events.clear()
            restarted_at = b.now()
            second = await server.start()
            await b.wait_for(reopened.wait(), 3)
            back_after = b.now() - restarted_at
            await b.eventually(lambda: second.stats().topics == {"a": 1, "b": 1})
            await b.sleep(0.3)  # room for a second sub:
            assert subscriptions(events) == {"a": 1, "b": 1}
            assert len(reconnects) == 1 and reconnects[0] >= 1
            for i in range(3):
                assert second.publish("a", f"x{i}") == 1 and second.publish("b", f"y{i}") == 1

            async def read_three() -> None:
                for _ in range(3):
                    streamed.append((await stream.__anext__()).data)

            await b.wait_for(read_three(), 2)
            await b.sleep(0.3)  # room for duplicates
            assert got == {"a": ["x0", "x1", "x2"], "b": ["y0", "y1", "y2"]}
            assert streamed == ["x0", "x1", "x2"]
            assert second.stats().connections == 1
            b.assert_tasks_while_open(client)
            print(f"\n{b.name} restart: reconnected {back_after * 1000:.0f} ms after the server "
                  f"came back (attempt {reconnects[0]}, {len(closes) - 1} refused attempts while "
                  "down)")
        await server.stop()

    backend.run(body)


def test_send_while_disconnected_is_queued_then_relayed_in_order_after_reconnect(
    backend: Backend,
) -> None:
    async def body(b: Backend) -> None:
        received: list[str] = []
        receiver_in = b.event()

        async def authenticate(request: UpgradeRequest) -> bool:
            # Hold the sender's upgrade until the receiver is in, so the relay has someone to reach.
            if request.user_id == "sender":
                await receiver_in.wait()
            return True

        def on_server_message(event: MessageReceived) -> None:
            received.append(event.text)

        server = Restartable(b, authenticate=authenticate, on_message=on_server_message)
        receiver_in.set()
        await server.start()
        relayed: list[str] = []
        async with b.connect(server.url, user_id="sender", send_queue_limit=3,
                             **QUICK) as sender:
            await sender.send("live")
            await b.eventually(lambda: received == ["live"])
            await server.stop()
            await b.eventually(lambda: not sender.connected)
            receiver_in = b.event()
            for text in ("one", "two", "three"):
                await sender.send(text)  # queued, no error
            assert sender.core.queued == 3
            with pytest.raises(LocalProtocolError, match="send_queue_limit"):
                await sender.send("four")
            second = await server.start()
            async with b.connect(
                server.url, user_id="receiver",
                on_message=lambda m: relayed.append(m.text) if m.topic is None else None,
                **QUICK,
            ):
                receiver_in.set()
                await b.eventually(lambda: relayed[-3:] == ["one", "two", "three"], timeout=5)
                await b.sleep(0.2)
                assert relayed == ["one", "two", "three"]
                assert received == ["live", "one", "two", "three"]
                assert sender.core.queued == 0 and second.stats().connections == 2
        await server.stop()

    backend.run(body)


def test_without_reconnect_a_lost_connection_closes_for_good(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        server = Restartable(b)
        await server.start()
        closes: list[tuple[int, str]] = []
        async with b.connect(server.url, reconnect=False,
                             on_close=lambda c, r: closes.append((c, r))) as client:
            stream = client.messages("t")
            await server.stop()
            await b.wait_for(client.wait_closed(), 2)
            assert client.closed and closes[0][0] == 1001
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            with pytest.raises(LocalProtocolError):
                await client.send("x")
        assert len(closes) == 1

    backend.run(body)


# ---------------------------------------------------------------------- heartbeat


def test_on_heartbeat_follows_the_servers_interval(backend: Backend) -> None:
    beats: list[float] = []

    async def body(b: Backend) -> None:
        server = await b.start_server(FAST)
        async with b.connect(server.url, on_heartbeat=lambda: beats.append(b.now())):
            await b.sleep(1.5)

    backend.run(body)
    gaps = [y - x for x, y in itertools.pairwise(beats)]
    assert len(beats) >= 5, beats
    mean = sum(gaps) / len(gaps)
    print(f"\n{backend.name} on_heartbeat: {len(beats)} in 1.5 s, gaps mean {mean * 1000:.0f} ms, "
          f"min {min(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms (server interval 200 ms)")
    assert 0.17 <= mean <= 0.25
    assert min(gaps) >= 0.1 and max(gaps) <= 0.35


def test_client_heartbeats_are_proof_of_life_and_never_relayed(backend: Backend) -> None:
    seen: list[MessageReceived] = []

    async def body(b: Backend) -> None:
        server = await b.start_server(FAST, on_message=seen.append)
        async with b.connect(server.url, heartbeat_interval=0.05, heartbeat_timeout=1.0) as client:
            await b.eventually(
                lambda: server.stats().pongs_received >= 1 and client.latency is not None
            )
            await b.sleep(0.2)

    backend.run(body)
    assert seen == []


def test_a_frozen_server_is_detected_and_the_client_comes_back_after_sigcont(
    backend: Backend,
) -> None:
    assert hasattr(signal, "SIGSTOP"), "needs SIGSTOP (POSIX)"
    timeout = 1.0
    stopped_for = 2.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tank_cli", "serve", *backend.cli_args, "--port", "0",
         "--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6", "--log-level", "warning"],
        stdout=subprocess.PIPE, cwd=ROOT, env=env,
    )

    async def body(b: Backend) -> None:
        assert proc.stdout is not None
        line = (await b.wait_for(b.to_thread(proc.stdout.readline), 10)).decode()
        assert line.startswith("tank: serving ws://"), line
        assert f"(backend {b.name})" in line, line
        url = line.split()[2]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        timeouts: list[tuple[float, float]] = []
        reconnects: list[tuple[float, int]] = []
        got: list[object] = []
        beats: list[float] = []
        async with b.connect(
            url, heartbeat_interval=0.2, heartbeat_timeout=timeout,
            reconnect_initial_delay=0.1, reconnect_max_delay=0.3, connect_timeout=0.5,
            on_heartbeat=lambda: beats.append(b.now()),
            on_heartbeat_timeout=lambda s: timeouts.append((b.now(), s)),
            on_reconnect=lambda a: reconnects.append((b.now(), a)),
        ) as client:
            await client.subscribe("news", lambda data, m: got.append(data))
            await b.eventually(lambda: len(beats) >= 2)
            assert await b.to_thread(http_publish, port, "news", "before") == 1
            await b.eventually(lambda: got == ["before"])

            await b.sleep(0.13)  # freeze between two heartbeats, not right after a message
            frozen_at = b.now()
            proc.send_signal(signal.SIGSTOP)
            await b.sleep(stopped_for)
            assert len(timeouts) == 1, timeouts
            last_beat = max(x for x in beats if x <= frozen_at)
            thawed_at = b.now()
            proc.send_signal(signal.SIGCONT)
            fired_at, silent_for = timeouts[0]
            last_sign = fired_at - silent_for  # what the client last heard (any frame)
            await b.eventually(lambda: bool(reconnects) and client.connected, timeout=5)
            back_at = reconnects[0][0]
            await b.eventually(lambda: http_topics(port) == {"news": 1}, timeout=5)
            assert await b.to_thread(http_publish, port, "news", "after") == 1
            await b.eventually(lambda: got == ["before", "after"])
            await b.sleep(0.3)  # room for duplicates
            assert got == ["before", "after"]
            assert len(reconnects) == 1
            print(f"\n{b.name} frozen server: on_heartbeat_timeout {fired_at - last_sign:.3f} s "
                  f"after the last sign of life (silent_for {silent_for:.3f} s, heartbeat_timeout "
                  f"{timeout} s; last text heartbeat {fired_at - last_beat:.3f} s before, "
                  f"SIGSTOP {fired_at - frozen_at:.3f} s before); back {back_at - thawed_at:.3f} s "
                  f"after SIGCONT (attempt {reconnects[0][1]}); messages: {got}")
            assert timeout - 1e-9 <= silent_for <= timeout + 0.5  # (float rounding at the deadline)
            # The text heartbeat is one of the signs of life (callback times lag the core's
            # clock readings by a scheduling step, hence the slack).
            assert last_beat <= last_sign + 0.05, (last_beat, last_sign)
            assert fired_at - last_beat <= timeout + 0.5
            assert timeout - 0.3 <= fired_at - frozen_at <= timeout + 0.5

    try:
        backend.run(body, timeout=30)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------------- TLS


def test_wss_goes_through_tls(backend: Backend) -> None:
    with tempfile.TemporaryDirectory() as directory:
        pair = self_signed(directory)
        assert pair is not None, "openssl (Debian's, on every machine here) made no certificate"
        cert, key = pair
        server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_side.load_cert_chain(cert, key)
        client_side = ssl.create_default_context(cafile=cert)

        async def body(b: Backend) -> None:
            server = await b.start_server(FAST)
            port = await b.start_tls_proxy(server.port, server_side)
            got: list[object] = []
            async with b.connect(f"wss://127.0.0.1:{port}/ws", ssl_context=client_side,
                                 **QUICK) as client:
                await client.subscribe("news", lambda data, m: got.append(data))
                await b.eventually(lambda: server.stats().topics.get("news") == 1)
                server.publish("news", "secret")
                await b.eventually(lambda: got == ["secret"])
            # The default context does not trust a self-signed certificate.
            with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                async with b.connect(f"wss://127.0.0.1:{port}/ws", reconnect=False):
                    pass

        backend.run(body)


# ---------------------------------------------------------------------- failure of the core


def test_a_core_failure_closes_the_client_and_leaving_the_block_reraises(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom(Exception):
        pass

    async def body(b: Backend) -> None:
        server = await b.start_server(FAST)
        with pytest.raises(Boom):
            async with b.connect(server.url, **QUICK) as client:

                def broken(event: object) -> Any:
                    raise Boom("core bug")

                client.core.receive = broken
                server.broadcast("anything")
                await b.wait_for(client.wait_closed(), 2)
                assert client.closed and not client.connected and client.timer is None
                with pytest.raises(LocalProtocolError, match="failed"):
                    await client.send("x")
        await b.eventually(lambda: server.stats().connections == 0)

    with caplog.at_level(logging.ERROR, logger="tank"):
        backend.run(body)
    assert "tank client failed" in caplog.text
