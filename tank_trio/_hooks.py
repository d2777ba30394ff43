"""Application hooks: plain functions run inline, coroutine functions through one bounded queue.

docs/embedding.md: a hook never reaches into the protocol. Plain functions are called in place; a
coroutine function's events go to one worker task per server through a bounded queue, and when the
application is slower than its events the extra ones are dropped and counted (``dropped``). An
exception in a hook is logged to logger ``tank`` and goes no further. ``authenticate`` is the one
hook whose answer matters: it becomes the verdict the core waits for (``verdict``).
"""

from __future__ import annotations

import http
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import trio

from tank_core import (
    AuthorizeSubscription,
    ClientConnected,
    ClientDisconnected,
    ErrorOccurred,
    HeartbeatTimedOut,
    MessageReceived,
    Notification,
    SlowConsumerClosed,
    TopicSubscribed,
    TopicUnsubscribed,
    UpgradeRequest,
)

__all__ = ["AuthHook", "Hook", "HookRunner", "SubscribeHook", "Verdict", "verdict"]

logger = logging.getLogger("tank")

#: A notification hook: a plain function or a coroutine function of one notification.
Hook: TypeAlias = Callable[[Any], object]
#: ``authenticate(request)``: True accepts, False refuses with 401, an int refuses with that status.
AuthHook: TypeAlias = Callable[[UpgradeRequest], "bool | int | Awaitable[bool | int]"]
#: ``authorize_subscribe(conn, topic)``: True allows; anything else (or an exception) refuses.
SubscribeHook: TypeAlias = Callable[[AuthorizeSubscription, str], object]
#: (accepted, status, reason) as fed back to the core.
Verdict: TypeAlias = tuple[bool, int, str]

_AsyncHook: TypeAlias = Callable[[Any], Awaitable[object]]
_Item: TypeAlias = tuple[tuple[_AsyncHook, ...], object]

_ALL_KINDS: tuple[type, ...] = (
    ClientConnected,
    ClientDisconnected,
    TopicSubscribed,
    TopicUnsubscribed,
    MessageReceived,
    HeartbeatTimedOut,
    SlowConsumerClosed,
    ErrorOccurred,
)

#: The queue between the protocol and the coroutine hooks (docs/embedding.md: 1024 by default).
DEFAULT_QUEUE_SIZE = 1024


def _is_async(hook: Hook) -> bool:
    return inspect.iscoroutinefunction(hook)


def _await_it(awaitable: Awaitable[object]) -> Awaitable[object]:
    """Lets an awaitable returned by a plain callable ride the queue like a coroutine hook."""
    return awaitable


def _hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


class HookRunner:
    """Routes each notification to the hooks that asked for its kind."""

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
        specific: dict[type, Hook | None] = {
            ClientConnected: on_connect,
            ClientDisconnected: on_disconnect,
            MessageReceived: on_message,
            ErrorOccurred: on_error,
        }
        self._table: dict[type, tuple[tuple[Hook, ...], tuple[_AsyncHook, ...]]] = {}
        for kind in _ALL_KINDS:
            hooks = [h for h in (specific.get(kind), on_event) if h is not None]
            if hooks:
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
                logger.exception("hook %s raised on %s", _hook_name(hook), type(event).__name__)
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
                        logger.exception(
                            "hook %s raised on %s", _hook_name(hook), type(event).__name__
                        )


def _interpret(result: object) -> Verdict:
    if result is True:
        return True, 0, ""
    if result is False or result is None:
        return False, 401, "Unauthorized"
    if isinstance(result, int) and not isinstance(result, bool) and 400 <= result <= 599:
        try:
            phrase = http.HTTPStatus(result).phrase
        except ValueError:
            phrase = "Refused"
        return False, result, phrase
    logger.error(
        "authenticate returned %r; expected True, False or an HTTP status 400-599: refusing", result
    )
    return False, 401, "Unauthorized"


async def verdict(hook: AuthHook, request: UpgradeRequest) -> Verdict:
    """Run ``authenticate(request)`` (plain or coroutine); an exception counts as a refusal."""
    try:
        result: object = hook(request)
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        logger.exception("authenticate raised: refusing the upgrade with 401")
        return False, 401, "Unauthorized"
    return _interpret(result)


def sync_verdict(hook: AuthHook, request: UpgradeRequest) -> Verdict | Awaitable[object]:
    """Run a plain ``authenticate`` in place; an awaitable result is handed back to be awaited."""
    try:
        result: object = hook(request)
    except Exception:
        logger.exception("authenticate raised: refusing the upgrade with 401")
        return False, 401, "Unauthorized"
    if inspect.isawaitable(result):
        return result
    return _interpret(result)


async def finish_verdict(pending: Awaitable[object]) -> Verdict:
    """Await what a plain ``authenticate`` returned (a coroutine from a callable object)."""
    try:
        result = await pending
    except Exception:
        logger.exception("authenticate raised: refusing the upgrade with 401")
        return False, 401, "Unauthorized"
    return _interpret(result)


def is_async(hook: AuthHook) -> bool:
    return inspect.iscoroutinefunction(hook)
