"""The ``authorize_subscribe(conn, topic)`` hook under trio: plain or coroutine, over real sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_helpers import QUICK, RawClient, run, start

from tank_core import AuthorizeSubscription, ConfigError, ServerConfig


def check(hook: Any) -> list[tuple[str, str]]:
    asked: list[tuple[str, str]] = []
    hook.asked = asked

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, authorize_subscribe=hook)
            client = await RawClient.connect(server.port, "/ws?user_id=alice")
            await client.recv_text()
            await client.send_text("sub:public")
            await client.send_text("sub:secret")
            with trio.fail_after(5):
                while server.stats().topics != {"public": 1}:
                    await trio.sleep(0.01)
            await trio.sleep(0.05)  # the refused one never arrives
            assert server.stats().topics == {"public": 1}
            assert server.publish("secret", "no") == 0
            assert server.publish("public", "yes") == 1
            assert json.loads(await client.recv_text()) == {"topic": "public", "data": "yes"}
            nursery.cancel_scope.cancel()

    run(body)
    return asked


def test_sync_hook_decides() -> None:
    def hook(conn: AuthorizeSubscription, topic: str) -> bool:
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        return topic == "public"

    assert check(hook) == [("alice", "public"), ("alice", "secret")]


def test_async_hook_decides() -> None:
    async def hook(conn: AuthorizeSubscription, topic: str) -> bool:
        await trio.sleep(0.01)  # e.g. a database look-up
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        return topic == "public"

    assert sorted(check(hook)) == [("alice", "public"), ("alice", "secret")]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_raising_hook_refuses(is_async: bool) -> None:
    def hook(conn: AuthorizeSubscription, topic: str) -> bool:
        hook.asked.append((conn.user_id, topic))  # type: ignore[attr-defined]
        if topic == "secret":
            raise RuntimeError("application bug")
        return True

    async def async_hook(conn: AuthorizeSubscription, topic: str) -> bool:
        return hook(conn, topic)

    async_hook.asked = []  # type: ignore[attr-defined]
    hook.asked = []  # type: ignore[attr-defined]
    check(async_hook if is_async else hook)


def test_unsubscribe_before_the_verdict_cancels_it() -> None:
    release = trio.Event()

    async def hook(conn: AuthorizeSubscription, topic: str) -> bool:
        await release.wait()
        return True

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, QUICK, authorize_subscribe=hook)
            client = await RawClient.connect(server.port)
            await client.recv_text()
            await client.send_text("sub:later")
            await client.send_text("unsub:later")
            await trio.sleep(0.1)
            release.set()
            await trio.sleep(0.1)
            assert server.stats().topics == {}
            nursery.cancel_scope.cancel()

    run(body)


def test_flag_without_hook_is_a_config_error() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConfigError):
                await start(nursery, ServerConfig(authorize_subscriptions=True))

    run(body)
