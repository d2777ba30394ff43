"""Application hooks: plain functions run inline, coroutine functions through one bounded queue.

docs/embedding.md: a hook never reaches into the protocol. Plain functions are called in place; a
coroutine function's events go to one worker task per server through a bounded queue, and when the
application is slower than its events the extra ones are dropped and counted (``dropped``). An
exception in a hook is logged to logger ``tank`` and goes no further. ``authenticate`` is the one
hook whose answer matters: it becomes the verdict the core waits for (``verdict``). Which hooks a
notification reaches and what ``authenticate``'s answer means: ``tank_core.hooks``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import trio

from tank_core import Notification, UpgradeRequest
from tank_core import hooks as core_hooks
from tank_core.describe import callable_name as _hook_name
from tank_core.hooks import AUTHENTICATE_RAISED, HOOK_RAISED, REFUSED, Hook, SubscribeHook, Verdict

__all__ = ["AuthHook", "Hook", "HookRunner", "SubscribeHook", "Verdict", "verdict"]

logger = logging.getLogger("tank")

#: ``authenticate(request)``: True accepts, False refuses with 401, an int refuses with that status.
AuthHook: TypeAlias = Callable[[UpgradeRequest], "bool | int | Awaitable[bool | int]"]

_AsyncHook: TypeAlias = Callable[[Any], Awaitable[object]]
_Item: TypeAlias = tuple[tuple[_AsyncHook, ...], object]

#: The queue between the protocol and the coroutine hooks (docs/embedding.md: 1024 by default).
DEFAULT_QUEUE_SIZE = core_hooks.HOOK_QUEUE_SIZE


def _is_async(hook: Hook) -> bool:
    return inspect.iscoroutinefunction(hook)


def _await_it(awaitable: Awaitable[object]) -> Awaitable[object]:
    """Lets an awaitable returned by a plain callable ride the queue like a coroutine hook."""
    return awaitable


class HookRunner:
    """Calls the plain hooks ``tank_core.hooks.hook_table`` gives each notification, and queues
    its coroutine hooks."""

    def __init__(
        self,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_message: Hook | None = None,
        on_error: Hook | None = None,
        on_event: Hook | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        table = core_hooks.hook_table(
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_message=on_message,
            on_error=on_error,
            on_event=on_event,
        )
        self._table: dict[type, tuple[tuple[Hook, ...], tuple[_AsyncHook, ...]]] = {}
        for kind, hooks in table.items():
            plain = tuple(h for h in hooks if not _is_async(h))
            coros: tuple[_AsyncHook, ...] = tuple(h for h in hooks if _is_async(h))  # type: ignore[misc]
            self._table[kind] = (plain, coros)
        self.needs_worker = any(coros for _plain, coros in self._table.values())
        self._send, self._receive = trio.open_memory_channel[_Item](queue_size)
        #: Notifications dropped because the coroutine hooks could not keep up.
        self.dropped = 0

    def notify(self, event: Notification) -> None:
        """Call the plain hooks now and queue the coroutine hooks; never raises, never waits."""
        entry = self._table.get(type(event))
        if entry is None:
            return
        plain, coros = entry
        for hook in plain:
            try:
                result = hook(event)
            except Exception:
                logger.exception(HOOK_RAISED, _hook_name(hook), type(event).__name__)
                continue
            if inspect.isawaitable(result):
                self._enqueue(((_await_it,), result))
        if coros:
            self._enqueue((coros, event))

    def _enqueue(self, item: _Item) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1
            pending = item[1]
            if inspect.iscoroutine(pending):
                pending.close()  # a dropped coroutine must not warn "never awaited"

    def close(self) -> None:
        """No more notifications: the worker finishes what is queued and returns."""
        self._send.close()

    async def run_worker(self) -> None:
        """The one task that awaits coroutine hooks, in order."""
        async with self._receive:
            async for hooks, event in self._receive:
                for hook in hooks:
                    try:
                        await hook(event)
                    except Exception:
                        logger.exception(HOOK_RAISED, _hook_name(hook), type(event).__name__)


def _interpret(result: object) -> Verdict:
    return core_hooks.interpret_verdict(result, logger.error)


async def verdict(hook: AuthHook, request: UpgradeRequest) -> Verdict:
    """Run ``authenticate(request)`` (plain or coroutine); an exception counts as a refusal."""
    try:
        result: object = hook(request)
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        logger.exception(AUTHENTICATE_RAISED)
        return REFUSED
    return _interpret(result)


def sync_verdict(hook: AuthHook, request: UpgradeRequest) -> Verdict | Awaitable[object]:
    """Run a plain ``authenticate`` in place; an awaitable result is handed back to be awaited."""
    try:
        result: object = hook(request)
    except Exception:
        logger.exception(AUTHENTICATE_RAISED)
        return REFUSED
    if inspect.isawaitable(result):
        return result
    return _interpret(result)


async def finish_verdict(pending: Awaitable[object]) -> Verdict:
    """Await what a plain ``authenticate`` returned (a coroutine from a callable object)."""
    try:
        result = await pending
    except Exception:
        logger.exception(AUTHENTICATE_RAISED)
        return REFUSED
    return _interpret(result)


def is_async(hook: AuthHook) -> bool:
    return inspect.iscoroutinefunction(hook)
