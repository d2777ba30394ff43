"""Time for the asyncio adapter: the core's ``now`` and the one timer's arming.

``now`` is ``time.monotonic()``: CPython's ``loop.time()`` clock at full resolution everywhere
(uvloop's ``loop.time()`` moves in 1 ms steps, cached per loop iteration). The timer gets a
millisecond of slack so a millisecond-granular loop (libuv) never fires before the deadline; what a
timer that still fires early does is the session's rule (``ServerSession._timer_fired``).
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
