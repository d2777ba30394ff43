"""The wire protocol (PROTOCOL.md) end to end through ``TankASGI`` mounted at ``/tank`` in FastAPI,
under uvicorn, hypercorn and hypercorn on trio: the ``websockets`` client, hand-made frames
(``RawClient``) and plain HTTP against the Tank API below the mount point.

What the ASGI server decides rather than Tank, found by running each of them and asserted here:

- a refused upgrade: uvicorn and hypercorn (both loops) offer the WebSocket denial-response
  extension, so the client gets Tank's status (401, or the hook's own); an application that hides
  the extension gets 403 from every one of them;
- backpressure: every server's ``send()`` waits for the socket (uvicorn on the transport's
  high-water mark, hypercorn on ``drain()`` / trio's ``send_all``), so a reader that stops is
  closed 1008 ``slow consumer`` once ``max_outbox_bytes`` is queued in the core;
- SIGTERM: see ``test_sigterm_what_clients_see``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time

import pytest
import websockets
from asgi_support import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    HYPERCORN_GRACEFUL_TIMEOUT,
    MAX_MESSAGE_SIZE,
    MAX_OUTBOX_BYTES,
    AsgiProcess,
)
from e2e_support import (
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    RawClient,
    close_payload,
    connect_hello,
    expect_next,
    hello,
    recv_data,
    run,
    wait_closed_code,
    ws_connect,
)


async def quiet(app: AsgiProcess) -> None:
    """Until the connections of earlier tests on this shared process are gone."""
    await app.await_stats(lambda s: s["connections"] == 0, timeout=5, what="no connections")


def topic_json(topic: str, data: str) -> str:
    return json.dumps({"topic": topic, "data": data}, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------ Hello


def test_hello_with_the_given_user_id_or_an_invented_one(main_app: AsgiProcess) -> None:
    async def main() -> None:
        async with ws_connect(f"{main_app.ws_url}?user_id=J%C3%BCrgen%20%3A%2F%3F%26x") as ws:
            assert await ws.recv() == hello("Jürgen :/?&x")
        async with ws_connect(f"{main_app.ws_url}?foo=1&user_id=bob&bar=2") as ws:
            assert await ws.recv() == hello("bob")
        ids = []
        for url in (main_app.ws_url, main_app.ws_url, f"{main_app.ws_url}?user_id=",
                    f"{main_app.ws_url}?x=1"):
            async with ws_connect(url) as ws:
                first = await ws.recv()
                assert isinstance(first, str)
                prefix, suffix = "Hello, ", "! Welcome to WebSocket server."
                assert first.startswith(prefix) and first.endswith(suffix), first
                ids.append(first[len(prefix):-len(suffix)])
        assert all(ids) and len(set(ids)) == len(ids), ids

    run(main())


# ------------------------------------------------------------------------------------ sub / unsub / publish


def test_sub_unsub_and_publish_through_the_mounted_api(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        a = await connect_hello(main_app.url("a"), "a")
        b = await connect_hello(main_app.url("b"), "b")
        c = await connect_hello(main_app.url("c"), "c")
        await a.send("sub:news")
        await a.send("sub:news")  # idempotent (the JS client repeats it)
        await b.send("sub:news")
        await b.send("sub:sport")
        await main_app.await_stats(lambda s: s["topics"] == {"news": 2, "sport": 1}, what="topics")

        # POST /tank/api/publish: delivered = the subscribers it was queued to.
        assert await main_app.apublish("news", "hello <&>") == 2
        for ws in (a, b):
            got = await recv_data(ws)
            assert isinstance(got, str) and got.startswith('{"topic":"news","data":'), got
            assert json.loads(got) == {"topic": "news", "data": "hello <&>"}
        assert await main_app.apublish("sport", "goal") == 1
        assert await main_app.apublish("nobody-here", "x") == 0
        assert await main_app.abroadcast("sentinel-1") == 3
        await expect_next(a, "sentinel-1")  # a got news exactly once, and no sport
        await expect_next(b, topic_json("sport", "goal"))
        await expect_next(b, "sentinel-1")
        await expect_next(c, "sentinel-1")  # c holds no topic

        # Unsubscribing a topic never held is harmless; sub/unsub are never relayed.
        await c.send("unsub:never-subscribed")
        await b.send("unsub:sport")
        await main_app.await_stats(lambda s: s["topics"] == {"news": 2}, what="sport gone")
        assert await main_app.apublish("sport", "late") == 0
        await a.send("unsub:news")
        await main_app.await_stats(lambda s: s["topics"] == {"news": 1}, what="a left news")
        assert await main_app.apublish("news", "to b") == 1
        assert await main_app.abroadcast("sentinel-2") == 3
        await expect_next(a, "sentinel-2")
        await expect_next(b, topic_json("news", "to b"))
        await expect_next(b, "sentinel-2")
        await expect_next(c, "sentinel-2")
        assert (await main_app.astats())["connections"] == 3  # nobody was closed

        # Order: one topic's messages arrive in publish order.
        for i in range(30):
            await main_app.apublish("news", str(i))
        assert [json.loads(await recv_data(b))["data"] for _ in range(30)] == [
            str(i) for i in range(30)]

    run(main())


# ------------------------------------------------------------------------------------ relay / broadcast


def test_relay_to_every_other_connection_never_the_sender(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        a = await connect_hello(main_app.url("a"), "a")
        b = await connect_hello(main_app.url("b"), "b")
        c = await connect_hello(main_app.url("c"), "c")
        await b.send("sub:unrelated")  # relay ignores subscriptions
        for text in ["hi there", '{"topic":"news","data":"spoof"}', "ünï ✓ <&>", "",
                     "x" * (MAX_MESSAGE_SIZE - 10)]:
            await a.send(text)
            await expect_next(b, text)
            await expect_next(c, text)
        # Binary that is valid UTF-8 is relayed as a text frame.
        await a.send("binary ✓".encode())
        got = await recv_data(b)
        assert got == "binary ✓" and isinstance(got, str)
        await expect_next(c, "binary ✓")
        assert await main_app.abroadcast("sentinel") == 3
        await expect_next(a, "sentinel")  # the sender got none of its own messages
        await expect_next(b, "sentinel")
        await expect_next(c, "sentinel")
        # Relays flow both ways, in order.
        await c.send("from c 1")
        await c.send("from c 2")
        for ws in (a, b):
            await expect_next(ws, "from c 1")
            await expect_next(ws, "from c 2")

    run(main())


def test_client_json_heartbeat_is_not_relayed(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        a = await connect_hello(main_app.url("a"), "a")
        b = await connect_hello(main_app.url("b"), "b")
        before = await main_app.astats()
        await a.send('{"type":"heartbeat"}')
        await a.send('{"type": "heartbeat", "extra": [1, 2]}')
        await a.send(b'{"type":"heartbeat"}')
        await a.send("after")
        await expect_next(b, "after")  # none of the heartbeats came before it
        after = await main_app.astats()
        assert after["messages_in"] >= before["messages_in"] + 4
        assert after["connections"] == 2

    run(main())


def test_broadcast_through_the_api_reaches_everyone_raw(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        clients = [await connect_hello(main_app.url(f"u{i}"), f"u{i}") for i in range(4)]
        await clients[0].send("sub:t")
        text = 'raw {"not":"wrapped"} ✓'
        assert await main_app.abroadcast(text) == 4
        for ws in clients:
            got = await recv_data(ws)
            assert got == text and isinstance(got, str)
        for ws in clients:
            await ws.close()
        await quiet(main_app)
        assert await main_app.abroadcast("nobody") == 0

    run(main())


# ------------------------------------------------------------------------------------ heartbeat


def test_text_heartbeat_every_interval_and_no_ping_from_tank(main_app: AsgiProcess) -> None:
    async def main() -> None:
        raw = await RawClient.connect(main_app, main_app.path, user_id="hb")
        start = time.monotonic()
        frames = []
        while time.monotonic() - start < 7 * HEARTBEAT_INTERVAL:
            frames.append(await raw.read_frame(2))
        heartbeats = [f.at for f in frames if f.opcode == OP_TEXT and f.payload == b"heartbeat"]
        assert [f for f in frames if f.opcode == OP_PING] == []  # the ASGI server owns pings
        assert len(heartbeats) == len(frames) >= 5, frames
        gaps = [b - a for a, b in itertools.pairwise(heartbeats)]
        assert all(0.5 * HEARTBEAT_INTERVAL < gap < 2.5 * HEARTBEAT_INTERVAL for gap in gaps), gaps
        mean = (heartbeats[-1] - heartbeats[0]) / (len(heartbeats) - 1)
        assert 0.8 * HEARTBEAT_INTERVAL < mean < 1.4 * HEARTBEAT_INTERVAL, gaps
        await raw.close()

    run(main())


def test_stats_count_no_pings_and_no_rtt(main_app: AsgiProcess) -> None:
    """Under ASGI Tank sends no Ping (the server sends its own) and never sees a Pong: the figures
    that say so (``/api/stats``, ``/metrics``, the status page) stay at zero."""

    async def main() -> None:
        await quiet(main_app)
        before = await main_app.astats()
        ws = await connect_hello(main_app.url("counted"), "counted")
        for _ in range(3):
            assert await asyncio.wait_for(ws.recv(), 1) == "heartbeat"
        after = await main_app.astats()
        assert after["rtt"] == {} and after["pongs_received"] == before["pongs_received"]
        assert after["pings_sent"] == before["pings_sent"], (before["pings_sent"], after["pings_sent"])

    run(main())


def test_silence_is_not_fatal_without_close_silent(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        silent = await RawClient.connect(main_app, main_app.path, user_id="silent")
        await silent.send_text("sub:quiet")  # then nothing at all, not even a Pong
        await main_app.await_stats(lambda s: s["topics"] == {"quiet": 1})
        heard = []
        end = silent.last_sent + 4 * HEARTBEAT_TIMEOUT
        while time.monotonic() < end:
            frame = await silent.read_frame(2)  # reading is not talking
            assert frame.opcode == OP_TEXT and frame.payload == b"heartbeat", frame
            heard.append(frame)
        assert len(heard) >= 8
        assert await main_app.apublish("quiet", "still here") == 1
        got = await silent.read_data()
        assert json.loads(got.payload) == {"topic": "quiet", "data": "still here"}
        snapshot = await main_app.astats()
        assert snapshot["heartbeat_timeouts"] == 0 and snapshot["connections"] == 1
        await silent.close()

    run(main())


def test_close_silent_closes_a_silent_client_1011(silent_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(silent_app)
        before = (await silent_app.astats())["heartbeat_timeouts"]
        talker = await connect_hello(silent_app.url("talker"), "talker")

        async def talk() -> None:  # a sign of life every interval, as tank.js does
            while True:
                await talker.send('{"type":"heartbeat"}')
                await asyncio.sleep(HEARTBEAT_INTERVAL)

        talking = asyncio.create_task(talk())
        silent = await RawClient.connect(silent_app, silent_app.path, user_id="silent")
        try:
            close, seen = await silent.read_until_close(timeout=3 * HEARTBEAT_TIMEOUT)
            silent_for = close.at - silent.last_sent
            assert close.close_code == 1011 and close.close_reason == "heartbeat timeout", close
            assert HEARTBEAT_TIMEOUT <= silent_for < HEARTBEAT_TIMEOUT + 0.6, silent_for
            assert all(f.payload == b"heartbeat" for f in seen)
            await silent.send_frame(OP_CLOSE, close_payload(1011))
            assert await silent.at_eof()  # the closing handshake is over: TCP goes
            # The talker outlives several timeouts.
            await asyncio.sleep(2 * HEARTBEAT_TIMEOUT)
            assert await silent_app.abroadcast("alive?") == 1
            await expect_next(talker, "alive?")
        finally:
            talking.cancel()
        snapshot = await silent_app.astats()
        assert snapshot["heartbeat_timeouts"] == before + 1
        assert snapshot["connections"] == 1

    run(main())


# ------------------------------------------------------------------------------------ limits


def test_message_larger_than_max_message_size_closes_1009(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        a = await connect_hello(main_app.url("a"), "a")
        b = await connect_hello(main_app.url("b"), "b")
        await a.send("x" * MAX_MESSAGE_SIZE)  # exactly the limit: relayed
        await expect_next(b, "x" * MAX_MESSAGE_SIZE)
        await a.send("y" * (MAX_MESSAGE_SIZE + 1))
        assert (await wait_closed_code(a))[0] == 1009
        # Fragmented: the limit counts the whole message.
        c = await connect_hello(main_app.url("c"), "c")
        half = MAX_MESSAGE_SIZE // 2 + 1
        await c.send(["z" * half, "z" * half])
        assert (await wait_closed_code(c))[0] == 1009
        assert await main_app.abroadcast("sentinel") == 1
        await expect_next(b, "sentinel")  # nothing of the oversized messages was relayed

    run(main())


def test_reader_that_stops_is_closed_1008_slow_consumer(main_app: AsgiProcess, asgi_server: str) -> None:
    payload = "p" * (MAX_MESSAGE_SIZE - 100)

    async def main() -> None:
        await quiet(main_app)
        before = (await main_app.astats())["slow_consumer_closes"]
        good = await connect_hello(main_app.url("good"), "good")
        await good.send("sub:big")
        stalled = await RawClient.connect(main_app, main_app.path, user_id="stalled", rcvbuf=4096)
        await stalled.send_text("sub:big")
        await main_app.await_stats(lambda s: s["topics"] == {"big": 2})
        stalled.stop_reading()
        published = 0
        closed = False
        for _ in range(400):  # 26 MB at most: far beyond kernel buffers plus the outbox
            await main_app.apublish("big", f"{published:06d}{payload}")
            published += 1
            got = json.loads(await recv_data(good, 5))
            assert got == {"topic": "big", "data": f"{published - 1:06d}{payload}"}
            if (await main_app.astats())["slow_consumer_closes"] > before:
                closed = True
                break
        assert closed, f"no slow-consumer close after {published} messages of {len(payload)} B"
        snapshot = await main_app.astats()
        assert snapshot["slow_consumer_closes"] == before + 1
        assert snapshot["heartbeat_timeouts"] == 0
        assert snapshot["topics"] == {"big": 1}
        # The others keep receiving after the closure.
        for _ in range(3):
            assert await main_app.apublish("big", f"{published:06d}{payload}") == 1
            published += 1
            assert json.loads(await recv_data(good, 5))["data"].startswith(f"{published - 1:06d}")
        # The stalled peer, once it reads again, finds whole messages in order, then Close 1008.
        stalled.resume_reading()
        close, frames = await stalled.read_until_close(timeout=5)
        assert close.close_code == 1008 and close.close_reason == "slow consumer", close
        received = [json.loads(f.payload)["data"][:6] for f in frames
                    if f.opcode == OP_TEXT and f.payload.startswith(b"{")]
        assert received == [f"{i:06d}" for i in range(len(received))]
        assert 0 < len(received) < published
        # Backpressure reached the core: it queued past the limit only once the socket was full.
        queued = (published - len(received)) * len(payload)
        assert queued > MAX_OUTBOX_BYTES, (published, len(received))
        print(f"{asgi_server}: slow consumer closed after {published} publishes of "
              f"{len(payload)} B; {len(received)} had reached its socket")

    run(main(), timeout=60)


# ------------------------------------------------------------------------------------ authentication


async def _status_and_body(app: AsgiProcess, target: str) -> tuple[int, bytes]:
    raw = await RawClient.open(app)
    try:
        status = await raw.handshake(target)
        body = b""
        if status != 101:
            body = await asyncio.wait_for(raw.reader.read(), 3)  # the server closes after it
        return status, body
    finally:
        await raw.close()


def test_refused_upgrade_gets_401_through_the_denial_response(main_app: AsgiProcess) -> None:
    async def main() -> None:
        await quiet(main_app)
        status, body = await _status_and_body(main_app, f"{main_app.path}?user_id=x&token=bad")
        assert status == 401 and b"Unauthorized" in body, (status, body)
        status, _ = await _status_and_body(main_app, f"{main_app.path}?user_id=x&token=teapot")
        assert status == 418  # the hook's own status, passed through
        with pytest.raises(websockets.InvalidStatus) as refused:
            await ws_connect(f"{main_app.ws_url}?user_id=x&token=bad")
        assert refused.value.response.status_code == 401
        # Without the denial-response extension (a mount that hides it), the server answers 403.
        bare = main_app.path.replace("/tank/", "/bare/")
        status, _ = await _status_and_body(main_app, f"{bare}?user_id=x&token=bad")
        assert status == 403
        async with ws_connect(f"ws://{main_app.host}:{main_app.port}{bare}?user_id=y&token=ok") as ws:
            assert await ws.recv() == hello("y")  # the mount itself works
        async with ws_connect(f"{main_app.ws_url}?user_id=z&token=ok") as ws:
            assert await ws.recv() == hello("z")
        await quiet(main_app)  # nothing refused was left open

    run(main())


def test_mounted_http_api_pages_and_the_application_routes(main_app: AsgiProcess) -> None:
    assert main_app.http("GET", "/healthz").status == 200
    assert main_app.http("GET", "/readyz").status == 200
    stats = main_app.http("GET", "/api/stats")
    assert stats.status == 200 and "slow_consumer_closes" in stats.json()
    metrics = main_app.http("GET", "/metrics")
    assert metrics.status == 200 and b"tank_connections " in metrics.body
    script = main_app.http("GET", "/tank.js")
    assert script.status == 200 and b"tank.js" in script.body
    assert main_app.http("GET", "/").status == 200  # the status page
    assert main_app.http("GET", "/nope").status == 404
    assert main_app.http("POST", "/api/publish", {"topic": 1}).status == 400
    assert main_app.http("GET", "/ws").status == 400  # not an upgrade
    # The application's own route answers beside Tank.
    ping = main_app.app_http("GET", "/app/ping")
    assert ping.status == 200 and ping.json() == {"pong": True, "tank_running": True}


# ------------------------------------------------------------------------------------ shutdown


def test_sigterm_what_clients_see(shutdown_app: AsgiProcess, asgi_server: str) -> None:
    """SIGTERM. Tank's own goodbye (``Server is shutting down``, Close 1001) is sent when the
    lifespan ends; every one of these servers ends the WebSockets first:

    - uvicorn closes every WebSocket itself at once with Close 1012 (service restart), then runs
      the lifespan's end: the clients see 1012 and no goodbye;
    - hypercorn (asyncio) stops listening, leaves the WebSockets open for its graceful timeout
      (3 s: Tank keeps serving them, heartbeats and relays flow), then cancels the application,
      which it reports with Close 1011; only then does the lifespan end;
    - hypercorn on trio does the same, but the cancelled connections end without a Close (1006).
    """
    app = shutdown_app

    async def main() -> None:
        a = await connect_hello(app.url("a"), "a")
        b = await connect_hello(app.url("b"), "b")
        raw = await RawClient.connect(app, app.path, user_id="raw")
        await a.send("sub:t")
        await app.await_stats(lambda s: s["topics"] == {"t": 1} and s["connections"] == 3)
        signalled = time.monotonic()
        app.send_signal(signal.SIGTERM)
        if asgi_server == "uvicorn":
            close, seen = await raw.read_until_close(timeout=2)
            assert close.close_code == 1012, close
            assert close.at - signalled < 1.0
            assert b"Server is shutting down" not in [f.payload for f in seen]
            for ws in (a, b):
                assert (await wait_closed_code(ws, 2))[0] == 1012
        else:
            await asyncio.sleep(0.5)
            assert app.running
            # No new connection is taken, while the open ones are served on.
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection(app.host, app.port), 2)
            await b.send("relayed during the grace period")
            await expect_next(a, "relayed during the grace period")
            close_or_eof = None
            frames = []
            deadline = signalled + HYPERCORN_GRACEFUL_TIMEOUT + 2
            while close_or_eof is None:
                try:
                    frame = await raw.read_frame(max(0.1, deadline - time.monotonic()))
                except asyncio.IncompleteReadError:
                    close_or_eof = "eof"
                    break
                if frame.opcode == OP_CLOSE:
                    close_or_eof = frame
                else:
                    frames.append(frame)
            ended = time.monotonic() - signalled
            assert HYPERCORN_GRACEFUL_TIMEOUT - 0.2 < ended < HYPERCORN_GRACEFUL_TIMEOUT + 1.5, ended
            texts = [f.payload for f in frames]
            assert b"Server is shutting down" not in texts, texts
            assert set(texts) == {b"heartbeat", b"relayed during the grace period"}, texts
            heartbeats = [f for f in frames if f.payload == b"heartbeat" and f.at > signalled + 1]
            assert len(heartbeats) >= 5  # Tank's timer runs on until the application is cancelled
            if asgi_server == "hypercorn":
                assert close_or_eof != "eof" and close_or_eof.close_code == 1011, close_or_eof
                expected = 1011
            else:
                assert close_or_eof == "eof", close_or_eof  # no Close frame at all
                expected = 1006
            for ws in (a, b):
                assert (await wait_closed_code(ws, 2))[0] == expected
        rc = await asyncio.to_thread(app.wait, 10)  # the exit status: test_asgi_example.py
        print(f"{asgi_server}: exit status {rc} on SIGTERM")

    run(main(), timeout=30)
