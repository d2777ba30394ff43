"""Every row of PROTOCOL.md through the `websockets` library client and plain HTTP, on both backends,
over ws:// and HTTP, and over wss:// and HTTPS.

Negative checks ("X is not delivered to Y") use a sentinel: once the server has provably handled X,
a broadcast is sent, and Y's next data message must be that broadcast.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import websockets
from e2e_support import (
    HEARTBEAT_INTERVAL,
    StartServer,
    TankProcess,
    Tls,
    connect_hello,
    expect_next,
    hello,
    recv_data,
    run,
    wait_closed_code,
    ws_connect,
)
from websockets.asyncio.client import ClientConnection

# ------------------------------------------------------------------------------------ handshake


def test_handshake_no_subprotocol_and_deflate_only_when_offered(start_server: StartServer) -> None:
    """PROTOCOL.md: no subprotocol is agreed; permessage-deflate is our [ext], agreed with
    ``server_no_context_takeover`` when offered, declined everywhere with --no-compression."""
    server = start_server()
    plain_server = start_server("--no-compression")
    big = json.dumps({"rows": [{"symbol": "EURUSD", "bid": 1.08, "ask": 1.09}] * 20})

    async def main() -> None:
        async with ws_connect(
            server.url("alice"), subprotocols=["tank", "chat"], compression="deflate"
        ) as zipped, ws_connect(server.url("bob"), compression=None) as plain:
            assert zipped.response.status_code == 101
            assert zipped.response.headers["Sec-WebSocket-Extensions"] == (
                "permessage-deflate; server_no_context_takeover"
            )
            assert "Sec-WebSocket-Protocol" not in zipped.response.headers
            assert zipped.subprotocol is None
            assert "Sec-WebSocket-Extensions" not in plain.response.headers
            for ws, name in ((zipped, "alice"), (plain, "bob")):
                assert await asyncio.wait_for(ws.recv(), 3) == hello(name)
                await ws.send("sub:big")
            await server.await_stats(lambda s: s["topics"] == {"big": 2}, what="2 subscribers")
            assert await server.apublish("big", big) == 2
            for ws in (zipped, plain):
                assert json.loads(await asyncio.wait_for(ws.recv(), 3))["data"] == big
            await server.await_stats(
                lambda s: s["compressed_connections"] == 1 and s["messages_compressed"] == 1
                and s["compression_bytes_saved"] > len(big) // 2,
                what="one compressed delivery",
            )
        async with ws_connect(plain_server.url("carol"), compression="deflate") as declined:
            assert "Sec-WebSocket-Extensions" not in declined.response.headers
            assert await asyncio.wait_for(declined.recv(), 3) == hello("carol")

    run(main())


def test_hello_user_id_is_url_decoded_verbatim(server: TankProcess) -> None:
    async def main() -> None:
        async with ws_connect(f"{server.ws_url}?user_id=J%C3%BCrgen%20%3A%2F%3F%26x") as ws:
            assert await ws.recv() == hello("Jürgen :/?&x")
        async with ws_connect(f"{server.ws_url}?foo=1&user_id=bob&bar=2") as ws:
            assert await ws.recv() == hello("bob")

    run(main())


def test_missing_or_empty_user_id_gets_a_unique_invented_one(server: TankProcess) -> None:
    async def main() -> None:
        ids = []
        for url in (server.ws_url, server.ws_url, f"{server.ws_url}?user_id=", f"{server.ws_url}?x=1"):
            async with ws_connect(url) as ws:
                first = await ws.recv()
                assert isinstance(first, str)
                prefix, suffix = "Hello, ", "! Welcome to WebSocket server."
                assert first.startswith(prefix) and first.endswith(suffix), first
                ids.append(first[len(prefix):-len(suffix)])
        assert all(ids), ids
        assert len(set(ids)) == len(ids), ids

    run(main())


def test_same_user_id_on_two_connections(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("twin"), "twin")
        b = await connect_hello(server.url("twin"), "twin")
        snapshot = await server.astats()
        assert snapshot["connections"] == 2
        assert await server.adisconnect("twin") == 2
        assert (await wait_closed_code(a))[0] == 1000
        assert (await wait_closed_code(b))[0] == 1000

    run(main())


# ------------------------------------------------------------------------------------ sub / unsub / publish


def test_subscribe_publish_unsubscribe(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send("sub:news")
        await a.send("sub:news")  # idempotent (the JS client repeats it)
        await b.send("sub:sport")
        await server.await_stats(lambda s: s["topics"] == {"news": 1, "sport": 1}, what="2 topics")

        assert await server.apublish("news", "hello") == 1
        await expect_next(a, '{"topic":"news","data":"hello"}')  # compact JSON, topic first
        assert await server.abroadcast("sentinel-1") == 2
        await expect_next(b, "sentinel-1")  # b is not subscribed to news
        await expect_next(a, "sentinel-1")  # and a got news exactly once

        # Sub and unsub messages are never relayed to others.
        await b.send("unsub:sport")
        await b.send("unsub:never-subscribed")  # a no-op, the connection stays
        await server.await_stats(lambda s: s["topics"] == {"news": 1}, what="sport gone")
        assert await server.apublish("sport", "x") == 0
        assert await server.abroadcast("sentinel-2") == 2
        await expect_next(b, "sentinel-2")
        await expect_next(a, "sentinel-2")

        await a.send("unsub:news")
        await server.await_stats(lambda s: s["topics"] == {}, what="no topics")
        assert await server.apublish("news", "late") == 0
        assert await server.abroadcast("sentinel-3") == 2
        await expect_next(a, "sentinel-3")
        await a.close()
        await b.close()

    run(main())


def test_topic_names_are_verbatim(server: TankProcess) -> None:
    topics = ["", "a:b:c", " spaced ", "Ünïcode ✓", "sub:nested", "{\"topic\":1}"]

    async def main() -> None:
        async with ws_connect(server.url("t")) as ws:
            await ws.recv()
            for topic in topics:
                await ws.send(f"sub:{topic}")
            await ws.send("SUB:upper")  # case-sensitive: a relay, not a subscription
            await ws.send(" sub:lead")  # leading whitespace: a relay too
            await server.await_stats(lambda s: len(s["topics"]) == len(topics), what="topics")
            snapshot = await server.astats()
            assert sorted(snapshot["topics"]) == sorted(topics)
            for topic in topics:
                assert await server.apublish(topic, f"to {topic}") == 1
                got = await recv_data(ws)
                assert isinstance(got, str)
                assert json.loads(got) == {"topic": topic, "data": f"to {topic}"}

    run(main())


def test_publish_escapes_and_order(server: TankProcess) -> None:
    async def main() -> None:
        async with ws_connect(server.url("o")) as ws:
            await ws.recv()
            await ws.send("sub:q")
            await server.await_stats(lambda s: s["topics"] == {"q": 1})
            tricky = '<b>&"quoted"\\ \n ünï ✓ {"topic":"x"}'
            assert await server.apublish("q", tricky) == 1
            got = await recv_data(ws)
            assert isinstance(got, str)
            assert json.loads(got) == {"topic": "q", "data": tricky}
            assert got.startswith('{"topic":"q","data":')
            for i in range(50):
                assert await server.apublish("q", str(i)) == 1
            received = [json.loads(await recv_data(ws))["data"] for _ in range(50)]
            assert received == [str(i) for i in range(50)]

    run(main())


def test_publish_delivered_counts_every_subscriber(server: TankProcess) -> None:
    async def main() -> None:
        clients = [await connect_hello(server.url(f"s{i}"), f"s{i}") for i in range(5)]
        for ws in clients[:3]:
            await ws.send("sub:fan")
        await server.await_stats(lambda s: s["topics"].get("fan") == 3)
        assert await server.apublish("fan", "out") == 3
        for ws in clients[:3]:
            await expect_next(ws, '{"topic":"fan","data":"out"}')
        assert await server.abroadcast("after") == 5
        for ws in clients[3:]:
            await expect_next(ws, "after")
        # A closed subscriber no longer counts.
        await clients[0].close()
        await server.await_stats(lambda s: s["topics"].get("fan") == 2)
        assert await server.apublish("fan", "two") == 2
        for ws in clients[1:]:
            await ws.close()

    run(main())


# ------------------------------------------------------------------------------------ relay


def test_relay_to_every_other_client_never_the_sender(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        c = await connect_hello(server.url("c"), "c")
        await b.send("sub:unrelated")  # relay ignores subscriptions
        for text in ["hi there", '{"topic":"news","data":"spoof"}', "ünï ✓ <&>", "", "x" * 70000]:
            await a.send(text)
            await expect_next(b, text)
            await expect_next(c, text)
        await server.abroadcast("sentinel")
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


def test_relay_of_binary_and_client_heartbeats(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        before = await server.astats()
        # Binary that is valid UTF-8 is relayed as a text frame.
        await a.send("binary ✓".encode())
        got = await recv_data(b)
        assert got == "binary ✓" and isinstance(got, str)
        # Binary that is not valid UTF-8 is dropped; JSON heartbeats are never relayed.
        await a.send(b"\xff\xfe\x00bad")
        await a.send('{"type":"heartbeat"}')
        await a.send('{"type": "heartbeat", "extra": [1, 2]}')
        await a.send(b'{"type":"heartbeat"}')
        await a.send("after")
        await expect_next(b, "after")
        after = await server.astats()
        assert after["messages_dropped"] == before["messages_dropped"] + 1
        assert after["messages_in"] >= before["messages_in"] + 5
        assert after["connections"] == 2  # nobody was closed for any of it

    run(main())


def test_bare_heartbeat_text_is_relayed(start_server: StartServer) -> None:
    # Without the server's own text heartbeats, any "heartbeat" b receives is a relay.
    server = start_server("--no-text-heartbeat")

    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send("heartbeat")
        await a.send('{"type":"heartbeat"}')
        await a.send("end")
        assert await asyncio.wait_for(b.recv(), 3) == "heartbeat"
        assert await asyncio.wait_for(b.recv(), 3) == "end"

    run(main())


def test_no_relay_option(start_server: StartServer) -> None:
    server = start_server("--no-relay")

    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send("not relayed")
        await a.send("sub:t")  # still processed in order after the message
        await server.await_stats(lambda s: s["topics"] == {"t": 1})
        await server.abroadcast("sentinel")
        await expect_next(b, "sentinel")

    run(main())


# ------------------------------------------------------------------------------------ broadcast


def test_broadcast_reaches_everyone_raw(server: TankProcess) -> None:
    async def main() -> None:
        clients = [await connect_hello(server.url(f"u{i}"), f"u{i}") for i in range(4)]
        text = 'raw {"not":"wrapped"} ✓'
        assert await server.abroadcast(text) == 4
        for ws in clients:
            got = await recv_data(ws)
            assert got == text and isinstance(got, str)
        for ws in clients:
            await ws.close()
        await server.await_stats(lambda s: s["connections"] == 0)
        assert await server.abroadcast("nobody") == 0

    run(main())


# ------------------------------------------------------------------------------------ closing


def test_disconnect_closes_with_1000(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("kick"), "kick")
        b = await connect_hello(server.url("stay"), "stay")
        assert await server.adisconnect("nobody") == 0
        assert await server.adisconnect("kick") == 1
        code, _reason = await wait_closed_code(a)
        assert code == 1000
        await server.await_stats(lambda s: s["connections"] == 1)
        await server.abroadcast("still here")
        await expect_next(b, "still here")

    run(main())


@pytest.mark.parametrize("code,reason", [(1000, ""), (1001, "going"), (4001, "app code ✓"), (3000, "")])
def test_client_close_is_echoed_with_same_code(server: TankProcess, code: int, reason: str) -> None:
    async def main() -> None:
        ws = await connect_hello(server.url("closer"), "closer")
        await ws.close(code, reason)
        assert ws.close_code == code  # the code of the Close frame the server sent back
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == code
        assert ws.protocol.close_rcvd_then_sent is False  # we sent first, the server answered
        await server.await_stats(lambda s: s["connections"] == 0)

    run(main())


def test_shutdown_says_goodbye_then_1001_after_pending_output(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send("sub:last")
        await server.await_stats(lambda s: s["topics"] == {"last": 1})
        for i in range(20):
            await server.apublish("last", f"m{i}")
        server.send_signal(signal.SIGTERM)
        got = [await recv_data(a) for _ in range(21)]
        assert got[:20] == [json.dumps({"topic": "last", "data": f"m{i}"}, separators=(",", ":"))
                            for i in range(20)]
        assert got[20] == "Server is shutting down"
        assert (await wait_closed_code(a))[0] == 1001
        assert await recv_data(b) == "Server is shutting down"
        assert (await wait_closed_code(b))[0] == 1001
        rc = await asyncio.to_thread(server.wait, 10)
        assert rc == 0
        assert server.extra_stdout == b"", server.extra_stdout  # exactly one stdout line

    run(main())


def test_sigint_also_shuts_down_gracefully(server: TankProcess) -> None:
    async def main() -> None:
        ws = await connect_hello(server.url("a"), "a")
        server.send_signal(signal.SIGINT)
        assert await recv_data(ws) == "Server is shutting down"
        assert (await wait_closed_code(ws))[0] == 1001
        assert await asyncio.to_thread(server.wait, 10) == 0

    run(main())


def test_message_too_big_closes_1009(start_server: StartServer) -> None:
    server = start_server("--max-message-size", "1024")

    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send("x" * 1024)  # exactly the limit: fine
        await expect_next(b, "x" * 1024)
        await a.send("y" * 1025)
        code, _ = await wait_closed_code(a)
        assert code == 1009
        # Fragmented: the limit counts the whole message.
        c = await connect_hello(server.url("c"), "c")
        await c.send(["z" * 600, "z" * 600])
        assert (await wait_closed_code(c))[0] == 1009
        await server.abroadcast("sentinel")
        await expect_next(b, "sentinel")  # nothing of the oversized messages was relayed

    run(main())


def test_invalid_utf8_text_closes_1007(server: TankProcess) -> None:
    async def main() -> None:
        a = await connect_hello(server.url("a"), "a")
        b = await connect_hello(server.url("b"), "b")
        await a.send(b"ok \xff\xfe", text=True)  # a text frame whose bytes are not UTF-8
        assert (await wait_closed_code(a))[0] == 1007
        await server.abroadcast("sentinel")
        await expect_next(b, "sentinel")

    run(main())


def test_client_ping_is_answered_and_connection_stays_across_heartbeats(server: TankProcess) -> None:
    async def main() -> None:
        ws = await connect_hello(server.url("p"), "p")
        latency = await (await ws.ping(b"payload-123"))
        assert latency >= 0
        # The websockets client answers the server's Pings: it outlives several timeouts.
        heartbeats = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 8 * HEARTBEAT_INTERVAL
        while loop.time() < end:
            try:
                msg = await asyncio.wait_for(ws.recv(), end - loop.time())
            except TimeoutError:
                break
            assert msg == "heartbeat"
            heartbeats += 1
        assert heartbeats >= 5, heartbeats
        snapshot = await server.astats()
        assert snapshot["connections"] == 1
        assert snapshot["pings_sent"] >= 5 and snapshot["pongs_received"] >= 5
        assert snapshot["heartbeat_timeouts"] == 0

    run(main())


def test_no_text_heartbeat_option(start_server: StartServer) -> None:
    server = start_server("--no-text-heartbeat")

    async def main() -> None:
        ws = await connect_hello(server.url("q"), "q")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 6 * HEARTBEAT_INTERVAL)
        snapshot = await server.astats()
        assert snapshot["pings_sent"] >= 3 and snapshot["connections"] == 1

    run(main())


def test_reconnect_burst_after_restart(start_server: StartServer) -> None:
    # PROTOCOL.md: "A server restart therefore meets a burst of reconnects, each followed by a
    # burst of sub: frames. [must] handle it." 500 clients at once, before and after a restart.
    clients_n = 500
    first = start_server()

    async def burst(server: TankProcess) -> list[ClientConnection]:
        # The 500 clients share this one event loop. Over TLS, 500 client handshakes at once would
        # block it for longer than the 0.6 s heartbeat timeout (measured: up to 0.8 s), and clients
        # would miss Pings through no fault of the server's: there they open 50 at a time.
        gate = asyncio.Semaphore(50 if server.tls else clients_n)

        async def one(i: int) -> ClientConnection:
            async with gate:
                ws: ClientConnection = await ws_connect(server.url(f"burst-{i}"))
                assert await ws.recv() == hello(f"burst-{i}")
                for _ in range(3):  # the JS client's repeated sub: frames
                    await ws.send("sub:storm")
                await ws.send(f"sub:own-{i % 10}")
            return ws

        clients = await asyncio.gather(*(one(i) for i in range(clients_n)))
        await server.await_stats(
            lambda s: s["topics"].get("storm") == clients_n and s["connections"] == clients_n,
            timeout=10, what="every client subscribed",
        )
        assert await server.apublish("storm", "all") == clients_n
        got = await asyncio.gather(*(recv_data(ws, 5) for ws in clients))
        assert set(got) == {'{"topic":"storm","data":"all"}'}
        return clients

    async def main() -> None:
        clients = await burst(first)
        first.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(wait_closed_code(ws) for ws in clients))
        assert {code for code, _ in codes} == {1001}
        assert await asyncio.to_thread(first.wait, 10) == 0
        second = await asyncio.to_thread(start_server, port=first.port)
        clients = await burst(second)
        snapshot = await second.astats()
        assert snapshot["topics"] == {"storm": clients_n, **{f"own-{i}": clients_n // 10 for i in range(10)}}

    run(main(), timeout=60)


# ------------------------------------------------------------------------------------ HTTP statuses


def test_healthz_stats_metrics_200(server: TankProcess) -> None:
    async def main() -> None:
        ws = await connect_hello(server.url("m"), "m")
        await ws.send("sub:alpha")
        await server.await_stats(lambda s: s["topics"] == {"alpha": 1})
        health = server.http("GET", "/healthz")
        assert (health.status, health.text) == (200, "ok")
        # Keep-alive: several requests on one HTTP connection.
        conn = server.http_connection()
        for target in ("/healthz", "/api/stats", "/metrics", "/healthz"):
            conn.request("GET", target)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, target
        conn.close()
        # Pongs answering our Pings give a round-trip time sample per connection.
        await asyncio.sleep(2 * HEARTBEAT_INTERVAL)
        rtts = list((await server.astats())["rtt"].values())
        assert len(rtts) == 1 and 0 <= rtts[0] < 0.5, rtts
        snapshot = server.stats()
        for key in ("messages_in", "messages_out", "pings_sent", "pongs_received",
                    "heartbeat_timeouts", "slow_consumer_closes"):
            assert isinstance(snapshot[key], int) and snapshot[key] >= 0, key
        assert snapshot["connections"] == 1
        assert snapshot["topics"] == {"alpha": 1}
        assert snapshot["messages_in"] >= 1 and snapshot["messages_out"] >= 1
        metrics = server.http("GET", "/metrics")
        assert metrics.status == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = metrics.text.splitlines()
        assert "tank_connections 1" in lines
        assert 'tank_topic_subscribers{topic="alpha"} 1' in lines
        assert any(line.startswith("tank_pings_sent_total ") for line in lines)
        assert any(line.startswith("# TYPE ") for line in lines)
        await ws.close()

    run(main())


def test_404_for_unknown_paths(server: TankProcess) -> None:
    # (`/` is the status page since issue 6: test_e2e_tankjs.py.)
    for target in ("/index.html", "/nope", "/ws/extra", "/wsx", "/api/nope"):
        answer = server.http("GET", target)
        assert answer.status == 404, (target, answer)
    answer = server.http("GET", "/nope", headers={
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
    })
    assert answer.status == 404


def test_400_for_bad_upgrades_and_bad_api_bodies(server: TankProcess) -> None:
    assert server.http("GET", "/ws").status == 400  # not an upgrade
    assert server.http("POST", "/ws", "x").status == 400
    bad_version = server.http("GET", "/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "8",
    })
    assert bad_version.status == 400
    no_key = server.http("GET", "/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
    })
    assert no_key.status == 400

    cases = [
        ("/api/publish", b"{not json", None),
        ("/api/publish", b"[1, 2]", None),
        ("/api/publish", b'{"data": "d"}', "topic"),
        ("/api/publish", b'{"topic": "t"}', "data"),
        ("/api/publish", b'{"topic": "t", "data": 5}', "data"),
        ("/api/publish", b'{"topic": null, "data": "d"}', "topic"),
        ("/api/broadcast", b"{}", "data"),
        ("/api/broadcast", b'{"data": {"a": 1}}', "data"),
        ("/api/disconnect", b'{"user": "x"}', "user_id"),
        ("/api/disconnect", b'{"user_id": 7}', "user_id"),
    ]
    for target, body, field in cases:
        answer = server.http("POST", target, body, headers={"Content-Type": "application/json"})
        assert answer.status == 400, (target, body, answer)
        error = answer.json()["error"]
        assert isinstance(error, str) and error
        if field is not None:
            assert field in error, (target, body, error)


def test_401_with_api_key(start_server: StartServer) -> None:
    server = start_server("--api-key", "s3cret")
    good = {"Authorization": "apikey s3cret"}
    for method, target, body in (
        ("GET", "/api/stats", None),
        ("GET", "/metrics", None),
        ("POST", "/api/publish", {"topic": "t", "data": "d"}),
        ("POST", "/api/broadcast", {"data": "d"}),
        ("POST", "/api/disconnect", {"user_id": "u"}),
    ):
        for headers in ({}, {"Authorization": "apikey wrong"}, {"Authorization": "Bearer s3cret"}):
            answer = server.http(method, target, body, headers)
            assert answer.status == 401, (target, headers, answer)
        assert server.http(method, target, body, good).status == 200, target
    assert server.http("GET", "/healthz").status == 200  # never needs the key

    async def main() -> None:
        # The API key guards the API only: WebSocket clients connect as before.
        server.api_key = "s3cret"
        ws = await connect_hello(server.url("k"), "k")
        await ws.send("sub:t")
        await server.await_stats(lambda s: s["topics"] == {"t": 1})
        assert await server.apublish("t", "keyed") == 1
        await expect_next(ws, '{"topic":"t","data":"keyed"}')

    run(main())


def test_403_for_origin_not_allowed(start_server: StartServer) -> None:
    server = start_server("--allowed-origin", "http://good.example",
                          "--allowed-origin", "https://also.example")

    async def main() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await ws_connect(server.url("o"), origin="http://evil.example")
        assert refused.value.response.status_code == 403
        for origin in ("http://good.example", "https://also.example"):
            ws = await ws_connect(server.url("o"), origin=origin)
            assert await ws.recv() == hello("o")
            await ws.close()
        snapshot = await server.astats()
        assert snapshot["connections_total"] == 2

    run(main())


# ------------------------------------------------------------------------------------ the command line


def test_cli_path_option_and_environment(start_server: StartServer) -> None:
    by_option = start_server("--path", "/custom")
    assert by_option.path == "/custom"
    by_env = start_server(env={"TANK_PATH": "/fromenv"})
    assert by_env.path == "/fromenv"

    async def main() -> None:
        for server in (by_option, by_env):
            ws = await connect_hello(server.url("p"), "p")
            await ws.close()
            assert server.http("GET", "/ws").status == 404

    run(main())


@pytest.mark.parametrize("bad", [
    ["--heartbeat-interval", "1", "--heartbeat-timeout", "0.5"],
    ["--heartbeat-interval", "nope"],
    ["--backend", "gevent"],
    ["--max-message-size", "-1"],
])
def test_cli_bad_option_is_one_line_and_exit_2(
    backend: str, tls_or_none: Tls | None, bad: list[str]
) -> None:
    import subprocess

    from e2e_support import ROOT, server_command

    args = [*server_command(), "serve", "--host", "127.0.0.1", "--port", "0"]
    if "--backend" not in bad:
        args += ["--backend", backend]
    if tls_or_none is not None:  # a good certificate does not hide a bad option
        args += tls_or_none.serve_args
    done = subprocess.run([*args, *bad], cwd=ROOT, capture_output=True, timeout=20)
    assert done.returncode == 2, done
    assert done.stdout == b""
    # Issue 3: "A bad option value is a one-line error and exit code 2."
    lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
