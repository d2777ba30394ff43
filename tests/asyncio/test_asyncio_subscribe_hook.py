"""The ``authorize_subscribe(conn, topic)`` hook, sync and async, over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from asyncio_support import client, eventually, run

import tank_asyncio

HOST = "127.0.0.1"


async def _text(ws: Any) -> str:
    while True:
        message = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(message, str)
        if message != "heartbeat":
            return message


def _check(hook: Any) -> None:
    asked: list[tuple[str, str]] = []

    async def main() -> None:
        async with tank_asyncio.serve(None, HOST, 0, authorize_subscribe=hook) as server:
            ws = await client(server.url + "?user_id=alice")
            await _text(ws)  # Hello
            await ws.send("sub:public")
            await ws.send("sub:secret")
            await eventually(lambda: server.stats().topics == {"public": 1})
            await asyncio.sleep(0.05)  # the refused one never arrives
            assert server.stats().topics == {"public": 1}
            assert server.publish("secret", "no") == 0
            assert server.publish("public", "yes") == 1
            assert await _text(ws) == '{"topic":"public","data":"yes"}'
            await ws.close()

    hook.asked = asked
    run(main())
    assert asked == [("alice", "public"), ("alice", "secret")]


def test_sync_subscribe_hook_decides() -> None:
    def hook(conn: Any, topic: str) -> bool:
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        return topic == "public"

    _check(hook)


def test_async_subscribe_hook_decides() -> None:
    async def hook(conn: Any, topic: str) -> bool:
        await asyncio.sleep(0.01)  # e.g. a database look-up
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        return topic == "public"

    _check(hook)


def test_a_raising_subscribe_hook_refuses() -> None:
    def hook(conn: Any, topic: str) -> bool:
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        if topic == "secret":
            raise RuntimeError("application bug")
        return True

    _check(hook)
