"""Application hooks (docs/embedding.md): plain functions inline, coroutine functions queued.

Plain hooks run at once (after the writes of the batch that produced the event). Coroutine hooks,
and awaitables returned by plain ones, go to one worker task per server through a bounded queue:
when the application is slower than its events, what does not fit is dropped and counted, and the
protocol never waits. An exception in a hook is logged (logger ``tank``) and goes no further.
Which hooks a notification reaches and what ``authenticate``'s answer means: ``tank_core.hooks``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tank_core import Notification, UpgradeRequest
from tank_core import hooks as core_hooks
from tank_core.describe import callable_name as hook_name
from tank_core.hooks import HOOK_QUEUE_SIZE, HOOK_RAISED, REFUSED, Hook, SubscribeHook, Verdict

__all__ = [
    "HOOK_QUEUE_SIZE",
    "AuthHook",
    "Hook",
    "HookRunner",
    "SubscribeHook",
    "Verdict",
    "interpret_verdict",
]

logger = logging.getLogger("tank")

#: ``authenticate(request)``: True accepts, False (or None) refuses with 401, an int with that status.
AuthHook = Callable[[UpgradeRequest], object]


def is_async(fn: Callable[..., object]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        type(fn).__call__  # an object with an async __call__
    )


def _identity(awaitable: object) -> object:
    return awaitable


def interpret_verdict(result: object) -> Verdict:
    """``authenticate``'s answer: True accepts; False (or None) is 401; an int 400-599 is that
    status; anything else is a refusal with 401, logged."""
    return core_hooks.interpret_verdict(result, logger.error)


class HookRunner:
    """Calls, or queues, the hooks ``tank_core.hooks.hook_table`` gives each notification."""

    def __init__(
        self,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_message: Hook | None = None,
        on_error: Hook | None = None,
        on_event: Hook | None = None,
        queue_size: int = HOOK_QUEUE_SIZE,
    ) -> None:
        hooks = core_hooks.hook_table(
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_message=on_message,
            on_error=on_error,
            on_event=on_event,
        )
        #: Notification types that have at least one hook: their hooks, each with is_async.
        self.table: dict[type, tuple[tuple[Hook, bool], ...]] = {
            kind: tuple((h, is_async(h)) for h in kind_hooks) for kind, kind_hooks in hooks.items()
        }
        self._queue_size = queue_size
        self._queue: asyncio.Queue[tuple[Callable[[Any], object], object]] | None = None
        self._worker: asyncio.Task[None] | None = None
        #: Notifications dropped because the coroutine hooks could not keep up.
        self.dropped = 0

    def notify(self, event: Notification) -> None:
        """Call the plain hooks now and queue the coroutine hooks; never raises, never waits."""
        for fn, asynchronous in self.table.get(type(event), ()):
            if asynchronous:
                self._enqueue(fn, event)
                continue
            try:
                result = fn(event)
            except Exception:
                logger.exception(HOOK_RAISED, hook_name(fn), type(event).__name__)
                continue
            if inspect.isawaitable(result):
                self._enqueue(_identity, result)

    def _enqueue(self, fn: Callable[[Any], object], arg: object) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = asyncio.Queue(self._queue_size)
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="tank-hooks")
        try:
            queue.put_nowait((fn, arg))
        except asyncio.QueueFull:
            if self.dropped == 0:
                logger.warning("coroutine hooks cannot keep up: dropping events (dropped_events)")
            self.dropped += 1
            if inspect.iscoroutine(arg):
                arg.close()  # a dropped coroutine must not warn "never awaited"

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            fn, arg = await queue.get()
            try:
                result = fn(arg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(HOOK_RAISED, hook_name(fn), type(arg).__name__)
            finally:
                queue.task_done()

    async def close(self, timeout: float) -> None:
        """Let the worker finish what is queued (at most ``timeout`` seconds), then stop it."""
        if self._worker is None or self._queue is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            logger.warning("coroutine hooks still busy at shutdown: cancelling them")
        self._worker.cancel()
        while not self._queue.empty():
            _fn, arg = self._queue.get_nowait()
            if inspect.iscoroutine(arg):
                arg.close()


async def await_verdict(pending: Awaitable[object]) -> Verdict:
    try:
        result = await pending
    except Exception:
        logger.exception(core_hooks.AUTHENTICATE_RAISED)
        return REFUSED
    return interpret_verdict(result)
