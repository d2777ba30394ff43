"""Helpers for the command-line tests: run a coroutine with a bound, open a `websockets` client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one test coroutine on a fresh event loop, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def client(url: str, **kwargs: Any) -> ClientConnection:
    """A `websockets` client; it answers Pings on its own, as browsers do."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("ping_interval", None)
    return await connect(url, proxy=None, compression=None, **kwargs)


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``check()`` is true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)
