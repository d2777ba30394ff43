"""``tank_asyncio.connect`` (issue 4) over real sockets on 127.0.0.1, against the real server.

Topic messages arrive once per callback, stream and ``on_message``; a server restart on the same
port is followed by one reconnect and exactly one ``sub:`` per held topic; ``on_heartbeat`` follows
the server's interval; ``send()`` while disconnected is queued and written in order after the
reconnect; a server frozen with SIGSTOP is detected within ``heartbeat_timeout`` + 0.5 s and the
client comes back after SIGCONT with working subscriptions.
"""

from __future__ import annotations

import asyncio
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
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from asyncio_support import eventually, run

import tank_asyncio
from tank_asyncio import Client, Server, serve
from tank_core import ConfigError, LocalProtocolError, ServerConfig
from tank_core.actions import UpgradeRequest
from tank_core.client import MessageArrived
from tank_core.notifications import ClientDisconnected, MessageReceived, TopicSubscribed

FAST = ServerConfig(heartbeat_interval=0.2, heartbeat_timeout=0.6, close_timeout=0.5)
#: Client settings for tests: quick retries, quick liveness checks.
QUICK: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.0,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 2.0,
}
ROOT = Path(__file__).resolve().parents[2]


class Restartable:
    """A server that can be stopped and started again on the same port."""

    def __init__(self, config: ServerConfig = FAST, **hooks: Any) -> None:
        self.config = config
        self.hooks = hooks
        self.port = 0
        self._cm: serve | None = None
        self.server: Server | None = None

    async def start(self) -> Server:
        self._cm = serve(self.config, "127.0.0.1", self.port, **self.hooks)
        self.server = await self._cm.__aenter__()
        self.port = self.server.port
        return self.server

    async def stop(self) -> None:
        assert self._cm is not None
        await self._cm.__aexit__(None, None, None)
        self._cm = None

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
    async def main() -> None:
        events: list[Any] = []
        async with serve(FAST, "127.0.0.1", 0, on_event=events.append) as server:
            seen: list[MessageArrived] = []
            by_callback: list[tuple[object, MessageArrived]] = []
            async with tank_asyncio.connect(server.url, user_id="alice", on_message=seen.append,
                                            **QUICK) as client:
                assert client.connected and client.user_id == "alice"
                await client.subscribe("news", lambda data, m: by_callback.append((data, m)))
                stream = client.messages("news")  # same topic: no second sub:
                await eventually(lambda: server.stats().topics.get("news") == 1)
                assert server.publish("news", "hello") == 1
                message = await asyncio.wait_for(stream.__anext__(), 2)
                await asyncio.sleep(0.3)  # room for duplicates
                assert message.topic == "news" and message.data == "hello"
                assert message.text == '{"topic":"news","data":"hello"}'
                assert [(d, m.topic) for d, m in by_callback] == [("hello", "news")]
                assert [m.data for m in seen if m.topic == "news"] == ["hello"]
                assert _subscriptions(events) == {"news": 1}
                assert client.topics == ("news",)

                await client.unsubscribe("news")
                await eventually(lambda: "news" not in server.stats().topics)
                assert server.publish("news", "gone") == 0
                with pytest.raises(StopAsyncIteration):
                    await asyncio.wait_for(stream.__anext__(), 1)
                assert client.latency is not None and 0 <= client.latency < 0.5

    run(main())


def test_leaving_the_block_closes_for_good_with_1000() -> None:
    async def main() -> None:
        gone: list[ClientDisconnected] = []
        async with serve(FAST, "127.0.0.1", 0, on_disconnect=gone.append) as server:
            closes: list[tuple[int, str, bool]] = []
            holder: list[Client] = []

            def on_close(code: int, reason: str) -> None:
                closes.append((code, reason, holder[0].closed))

            async with tank_asyncio.connect(server.url, on_close=on_close, **QUICK) as client:
                holder.append(client)
                stream = client.messages("t")
                assert client.timer is not None
                deadline = client.core.next_deadline()
                assert deadline is not None
                # armed at (or a millisecond of slack after) the core's deadline, never before
                assert deadline <= client.timer.when() <= deadline + 0.01
            assert client.closed and not client.connected
            assert client.timer is None
            assert closes == [(1000, "", True)]
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            with pytest.raises(LocalProtocolError):
                await client.send("late")
            with pytest.raises(LocalProtocolError):
                await client.subscribe("late")
            await client.close()  # idempotent
            await client.wait_closed()
            await eventually(lambda: len(gone) == 1)
            assert gone[0].code == 1000

    run(main())


def test_async_callbacks_run_and_their_exceptions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        got: list[object] = []

        async def on_message(message: MessageArrived) -> None:
            await asyncio.sleep(0)
            if message.topic == "news":
                raise RuntimeError("boom in on_message")

        def broken(data: object, message: MessageArrived) -> None:
            raise ValueError("boom in a topic callback")

        async def topic_callback(data: object, message: MessageArrived) -> None:
            await asyncio.sleep(0.01)
            got.append(data)

        async with (
            serve(FAST, "127.0.0.1", 0) as server,
            tank_asyncio.connect(server.url, on_message=on_message, **QUICK) as client,
        ):
            await client.subscribe("news", broken)
            await client.subscribe("news", topic_callback)  # replaces `broken`
            await client.subscribe("other", broken)
            await eventually(lambda: server.stats().topics == {"news": 1, "other": 1})
            server.publish("other", "x")
            for i in range(3):
                server.publish("news", str(i))
            await eventually(lambda: len(got) == 3)
            assert got == ["0", "1", "2"]
            assert client.connected

        text = caplog.text
        assert "boom in on_message" in text and "boom in a topic callback" in text
        assert all(r.name == "tank" for r in caplog.records if r.levelno >= logging.ERROR)

    with caplog.at_level(logging.ERROR, logger="tank"):
        run(main())


def test_a_full_stream_drops_and_counts_without_touching_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            everything: list[object] = []
            async with tank_asyncio.connect(server.url, **QUICK) as client:
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
                await small.aclose()
                server.publish("news", "5")
                await eventually(lambda: len(everything) == 6)
                with pytest.raises(StopAsyncIteration):
                    await small.__anext__()
                assert (await roomy.__anext__()).data == "5"
                with pytest.raises(LocalProtocolError):
                    client.messages("news", max_queued=0)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.message]
        assert len(warnings) == 1

    with caplog.at_level(logging.WARNING, logger="tank"):
        run(main())


def test_bad_settings_raise_config_error_at_once() -> None:
    with pytest.raises(ConfigError):
        tank_asyncio.connect("http://127.0.0.1:1/ws")
    with pytest.raises(ConfigError):
        tank_asyncio.connect("ws://127.0.0.1:1/ws", heartbeat_interval=5, heartbeat_timeout=5)


# ---------------------------------------------------------------------- first connect


def test_first_connect_refused_without_reconnect_is_a_connection_error() -> None:
    async def main() -> None:
        port = _closed_port()
        closes: list[tuple[int, str]] = []
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            async with tank_asyncio.connect(f"ws://127.0.0.1:{port}/ws", reconnect=False,
                                            on_close=lambda c, r: closes.append((c, r))):
                raise AssertionError("not reached")
        assert time.monotonic() - started < 1
        assert f"127.0.0.1:{port}" in str(info.value) and "Connect" in str(info.value)
        assert len(closes) == 1 and closes[0][0] == 1006

    run(main())


def test_first_connect_with_reconnect_gives_up_after_connect_timeout() -> None:
    async def main() -> None:
        port = _closed_port()
        closes: list[tuple[int, str]] = []
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            async with tank_asyncio.connect(
                f"ws://127.0.0.1:{port}/ws", connect_timeout=0.6, reconnect_initial_delay=0.05,
                reconnect_max_delay=0.1, on_close=lambda c, r: closes.append((c, r)),
            ):
                raise AssertionError("not reached")
        took = time.monotonic() - started
        assert 0.55 <= took < 1.5, took
        assert "within 0.6 s" in str(info.value) and "Connect" in str(info.value)
        assert len(closes) >= 3  # several attempts, each reported
        assert closes[-1] == (1000, "")  # then closed for good

    run(main())


def test_first_connect_succeeds_once_the_server_comes_up() -> None:
    async def main() -> None:
        server = Restartable()
        server.port = _closed_port()
        reconnects: list[int] = []

        async def later() -> None:
            await asyncio.sleep(0.3)
            await server.start()

        starter = asyncio.get_running_loop().create_task(later())
        async with tank_asyncio.connect(server.url, on_reconnect=reconnects.append,
                                        **QUICK) as client:
            assert client.connected
            assert reconnects == []  # the first open is not a reconnect
        await starter
        await server.stop()

    run(main())


# ---------------------------------------------------------------------- reconnect


def test_server_restart_on_the_same_port_resubscribes_once_and_delivers_once() -> None:
    async def main() -> None:
        events: list[Any] = []
        server = Restartable(on_event=events.append)
        first = await server.start()
        got: dict[str, list[object]] = {"a": [], "b": []}
        reconnects: list[int] = []
        reopened = asyncio.Event()
        closes: list[tuple[int, str]] = []

        def on_reconnect(attempt: int) -> None:
            reconnects.append(attempt)
            reopened.set()

        async with tank_asyncio.connect(server.url, on_reconnect=on_reconnect,
                                        on_close=lambda c, r: closes.append((c, r)),
                                        **QUICK) as client:
            await client.subscribe("a", lambda d, m: got["a"].append(d))
            await client.subscribe("b", lambda d, m: got["b"].append(d))
            stream = client.messages("a")
            await eventually(lambda: first.stats().topics == {"a": 1, "b": 1})

            await server.stop()
            assert closes[0][0] == 1001
            await asyncio.sleep(0.3)  # a few refused attempts
            assert not client.connected and len(closes) >= 2
            events.clear()
            restarted_at = time.monotonic()
            second = await server.start()
            await asyncio.wait_for(reopened.wait(), 3)
            back_after = time.monotonic() - restarted_at
            await eventually(lambda: second.stats().topics == {"a": 1, "b": 1})
            await asyncio.sleep(0.3)  # room for a second sub:
            assert _subscriptions(events) == {"a": 1, "b": 1}
            assert len(reconnects) == 1 and reconnects[0] >= 1
            assert second.publish("a", "x") == 1 and second.publish("b", "y") == 1
            first_message = await asyncio.wait_for(stream.__anext__(), 2)
            await asyncio.sleep(0.3)
            assert got == {"a": ["x"], "b": ["y"]}
            assert first_message.data == "x"
            assert second.stats().connections == 1
            print(f"\nrestart: reconnected {back_after * 1000:.0f} ms after the server came back "
                  f"(attempt {reconnects[0]}, {len(closes) - 1} refused attempts while down)")
        await server.stop()

    run(main())


def test_send_while_disconnected_is_queued_then_relayed_in_order_after_reconnect() -> None:
    async def main() -> None:
        received: list[str] = []
        receiver_in = asyncio.Event()

        async def authenticate(request: UpgradeRequest) -> bool:
            # Hold the sender's upgrade until the receiver is in, so the relay has someone to reach.
            if request.user_id == "sender":
                await receiver_in.wait()
            return True

        server = Restartable(authenticate=authenticate,
                             on_message=lambda e: received.append(e.text))
        receiver_in.set()
        await server.start()
        relayed: list[str] = []
        async with tank_asyncio.connect(server.url, user_id="sender", send_queue_limit=3,
                                        **QUICK) as sender:
            await sender.send("live")
            await eventually(lambda: received == ["live"])
            await server.stop()
            await eventually(lambda: not sender.connected)
            receiver_in.clear()
            for text in ("one", "two", "three"):
                await sender.send(text)  # queued, no error
            assert sender.core.queued == 3
            with pytest.raises(LocalProtocolError, match="send_queue_limit"):
                await sender.send("four")
            second = await server.start()
            async with tank_asyncio.connect(
                server.url, user_id="receiver",
                on_message=lambda m: relayed.append(m.text) if m.topic is None else None, **QUICK,
            ):
                receiver_in.set()
                await eventually(lambda: relayed[-3:] == ["one", "two", "three"], timeout=5)
                await asyncio.sleep(0.2)
                assert [t for t in relayed if not t.startswith("Hello")] == ["one", "two", "three"]
                assert received == ["live", "one", "two", "three"]
                assert sender.core.queued == 0 and second.stats().connections == 2
        await server.stop()

    run(main())


def test_without_reconnect_a_lost_connection_closes_for_good() -> None:
    async def main() -> None:
        server = Restartable()
        await server.start()
        closes: list[tuple[int, str]] = []
        async with tank_asyncio.connect(server.url, reconnect=False,
                                        on_close=lambda c, r: closes.append((c, r))) as client:
            stream = client.messages("t")
            await server.stop()
            await asyncio.wait_for(client.wait_closed(), 2)
            assert client.closed and closes[0][0] == 1001
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            with pytest.raises(LocalProtocolError):
                await client.send("x")
        assert len(closes) == 1

    run(main())


# ---------------------------------------------------------------------- heartbeat


def test_on_heartbeat_follows_the_servers_interval() -> None:
    async def main() -> None:
        beats: list[float] = []
        async with (
            serve(FAST, "127.0.0.1", 0) as server,
            tank_asyncio.connect(server.url, on_heartbeat=lambda: beats.append(time.monotonic())),
        ):
            await asyncio.sleep(1.5)
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert len(beats) >= 5, beats
        mean = sum(gaps) / len(gaps)
        print(f"\non_heartbeat: {len(beats)} in 1.5 s, gaps mean {mean * 1000:.0f} ms, "
              f"min {min(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms (server interval 200 ms)")
        assert 0.17 <= mean <= 0.25
        assert min(gaps) >= 0.1 and max(gaps) <= 0.35

    run(main())


def _http_publish(port: int, topic: str, data: str) -> int:
    body = json.dumps({"topic": topic, "data": data}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.loads(response.read())["delivered"])


def _http_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_frozen_server_is_detected_and_the_client_comes_back_after_sigcont() -> None:
    timeout = 1.0
    stopped_for = 2.0

    async def main() -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANK_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tank_cli", "serve", "--port", "0",
            "--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6", "--log-level", "warning",
            stdout=subprocess.PIPE, cwd=ROOT, env=env,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            url = line.split()[2]
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            loop = asyncio.get_running_loop()
            timeouts: list[tuple[float, float]] = []
            reconnects: list[tuple[float, int]] = []
            got: list[object] = []
            beats: list[float] = []
            async with tank_asyncio.connect(
                url, heartbeat_interval=0.2, heartbeat_timeout=timeout,
                reconnect_initial_delay=0.1, reconnect_max_delay=0.3, connect_timeout=0.5,
                on_heartbeat=lambda: beats.append(loop.time()),
                on_heartbeat_timeout=lambda s: timeouts.append((loop.time(), s)),
                on_reconnect=lambda a: reconnects.append((loop.time(), a)),
            ) as client:
                await client.subscribe("news", lambda data, m: got.append(data))
                await eventually(lambda: len(beats) >= 2)
                assert await asyncio.to_thread(_http_publish, port, "news", "before") == 1
                await eventually(lambda: got == ["before"])

                await asyncio.sleep(0.13)  # freeze between two heartbeats, not right after a message
                frozen_at = loop.time()
                proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(stopped_for)
                assert len(timeouts) == 1, timeouts
                thawed_at = loop.time()
                proc.send_signal(signal.SIGCONT)
                fired_at, silent_for = timeouts[0]
                await eventually(lambda: bool(reconnects) and client.connected, timeout=5)
                back_at = reconnects[0][0]
                await eventually(lambda: _stats_topics(port) == {"news": 1}, timeout=5)
                assert await asyncio.to_thread(_http_publish, port, "news", "after") == 1
                await eventually(lambda: got == ["before", "after"])
                await asyncio.sleep(0.3)
                assert got == ["before", "after"]
                assert len(reconnects) == 1
                print(f"\nfrozen server: on_heartbeat_timeout {fired_at - frozen_at:.3f} s after "
                      f"SIGSTOP (silent_for {silent_for:.3f} s, heartbeat_timeout {timeout} s); "
                      f"back {back_at - thawed_at:.3f} s after SIGCONT (attempt {reconnects[0][1]})")
                assert timeout - 1e-9 <= silent_for <= timeout + 0.5  # (float rounding at the deadline)
                assert timeout - 0.3 <= fired_at - frozen_at <= timeout + 0.5
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def _stats_topics(port: int) -> dict[str, int]:
        topics: dict[str, int] = _http_stats(port)["topics"]
        return topics

    run(main(), timeout=30)


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

        async def main() -> None:
            server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_side.load_cert_chain(cert, key)
            client_side = ssl.create_default_context(cafile=cert)

            async with serve(FAST, "127.0.0.1", 0) as server:

                async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    try:
                        while data := await reader.read(65536):
                            writer.write(data)
                            await writer.drain()
                    except (ConnectionError, ssl.SSLError):
                        pass
                    finally:
                        writer.close()

                async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
                    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

                proxy = await asyncio.start_server(terminate, "127.0.0.1", 0, ssl=server_side)
                port = proxy.sockets[0].getsockname()[1]
                got: list[object] = []
                async with tank_asyncio.connect(f"wss://127.0.0.1:{port}/ws", ssl_context=client_side,
                                                **QUICK) as client:
                    await client.subscribe("news", lambda data, m: got.append(data))
                    await eventually(lambda: server.stats().topics.get("news") == 1)
                    server.publish("news", "secret")
                    await eventually(lambda: got == ["secret"])
                # The default context does not trust a self-signed certificate.
                with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                    async with tank_asyncio.connect(f"wss://127.0.0.1:{port}/ws", reconnect=False):
                        pass
                proxy.close()
                await proxy.wait_closed()

        run(main())


def test_client_heartbeats_are_proof_of_life_and_never_relayed() -> None:
    async def main() -> None:
        seen: list[MessageReceived] = []
        async with (
            serve(FAST, "127.0.0.1", 0, on_message=seen.append) as server,
            tank_asyncio.connect(server.url, heartbeat_interval=0.05, heartbeat_timeout=1.0) as client,
        ):
            await eventually(lambda: server.stats().pongs_received >= 1 and client.latency is not None)
            await asyncio.sleep(0.2)
        assert seen == []

    run(main())


def test_a_core_failure_closes_the_client_and_leaving_the_block_reraises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        async with serve(FAST, "127.0.0.1", 0) as server:
            with pytest.raises(Boom):
                async with tank_asyncio.connect(server.url, **QUICK) as client:

                    def broken(event: object) -> Any:
                        raise Boom("core bug")

                    client.core.receive = broken  # type: ignore[method-assign]
                    server.broadcast("anything")
                    await asyncio.wait_for(client.wait_closed(), 2)
                    assert client.closed and not client.connected and client.timer is None
                    with pytest.raises(LocalProtocolError, match="failed"):
                        await client.send("x")
            await eventually(lambda: server.stats().connections == 0)

    with caplog.at_level(logging.ERROR, logger="tank"):
        run(main())
    assert "tank client failed" in caplog.text
