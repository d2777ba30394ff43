"""Time for the asyncio adapter: the core's ``now`` and the one timer's arming.

``now`` is ``time.monotonic()``: the same clock as CPython's ``loop.time()``, but at full
resolution everywhere (uvloop's ``loop.time()`` moves in 1 ms steps, cached per loop iteration,
which made round-trip times 0 or 1 ms and could judge a peer's silence a hair early).

The timer is armed with ``call_later`` plus a millisecond of slack, so it fires at or after the
deadline (libuv rounds timers to milliseconds). Should it still fire early, the adapter re-arms
instead of ticking with a forged clock: the core never closes a peer for silence before
``heartbeat_timeout`` has really passed (PROTOCOL.md, "Our decisions").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["TIMER_SLACK", "arm", "now"]

now = time.monotonic

#: Added to each delay so a millisecond-granular loop never wakes before the deadline.
TIMER_SLACK = 0.001


def arm(
    loop: asyncio.AbstractEventLoop, deadline: float, callback: Callable[[], object]
) -> asyncio.TimerHandle:
    """Call ``callback`` once ``now()`` has reached ``deadline``."""
    return loop.call_later(max(0.0, deadline - time.monotonic()) + TIMER_SLACK, callback)
