"""The early-wake rule of the one timer, for the server's and the client's session rules alike.

Timers can fire a hair early (clocks with coarse steps, DESIGN.md §2). A timer that fires at most
``EARLY_WAKE_SLACK`` before the deadline it was armed for ticks *at* that deadline, so the core sees
the time it asked for; one that finds its deadline further ahead was moved since (armed for later)
and only re-arms.
"""

from __future__ import annotations

__all__ = ["EARLY_WAKE_SLACK", "tick_time"]

#: How early a timer may fire and still count as on time.
EARLY_WAKE_SLACK = 0.001


def tick_time(now: float, armed: float | None) -> float | None:
    """The ``now`` to tick with when a timer armed for ``armed`` fires at ``now``; None: too
    early, re-arm instead."""
    if armed is None or now >= armed:
        return now
    if armed - now > EARLY_WAKE_SLACK:
        return None
    return armed
