"""Connections the core asks for (``OpenConnection``: a cluster node's Redis links) under trio: they
are driven by the same reader and writer as accepted sockets, given up on the core's word (even
while still connecting), and leave nothing behind at shutdown. Real Redis: tests/cluster."""

from __future__ import annotations

import dataclasses

import trio
from trio_helpers import RawClient, count_tasks, run, start

from tank_core import BrokerConfig, ServerConfig
from tank_core.notifications import BrokerDown, Notification


def _config(port: int) -> ServerConfig:
    broker = BrokerConfig.from_url(f"redis://127.0.0.1:{port}/0")
    return ServerConfig(
        close_timeout=0.3,
        broker=dataclasses.replace(broker, connect_timeout=0.3, probe_timeout=0.3),
    )


def test_a_silent_redis_is_written_to_given_up_and_retried() -> None:
    received: list[bytes] = []
    accepted: list[trio.SocketStream] = []
    events: list[Notification] = []

    async def fake_redis(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        try:
            while data := await stream.receive_some(65536):
                received.append(data)
        except trio.BrokenResourceError:
            pass

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, fake_redis, listeners)
            port = listeners[0].socket.getsockname()[1]
            server = await start(nursery, _config(port), on_event=events.append)
            with trio.fail_after(5):
                while len(accepted) < 4:  # two attempts of both links: given up, then retried
                    await trio.sleep(0.01)
            assert received and all(chunk.startswith(b"*") for chunk in received)  # RESP commands
            assert any(isinstance(event, BrokerDown) for event in events)
            assert count_tasks("tank writer") <= 2  # only the links of the current attempt
            # Local service goes on while the broker is down.
            client = await RawClient.connect(server.port, "/ws?user_id=local")
            await client.recv_text()
            await server.shutdown()
            assert not server._conns and not server._opening
            assert count_tasks("tank reader") == count_tasks("tank writer") == 0
            nursery.cancel_scope.cancel()

    run(body)


def test_a_refused_redis_is_reported_down_and_local_delivery_goes_on() -> None:
    events: list[Notification] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            closed = trio.socket.socket()
            await closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            closed.close()  # nothing listens there: connection refused
            server = await start(nursery, _config(port), on_event=events.append)
            with trio.fail_after(5):
                while not any(isinstance(event, BrokerDown) for event in events):
                    await trio.sleep(0.01)
            client = await RawClient.connect(server.port, "/ws?user_id=local")
            await client.recv_text()
            await client.send_text("sub:news")
            with trio.fail_after(5):
                while server.stats().topics.get("news") != 1:
                    await trio.sleep(0.01)
            assert server.publish("news", "still here") == 1
            assert await client.recv_text() == '{"topic":"news","data":"still here"}'
            with trio.fail_after(2):
                await server.shutdown()
            assert not server._conns and not server._opening
            nursery.cancel_scope.cancel()

    run(body)
