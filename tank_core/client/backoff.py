"""The client's reconnect policy: how long to wait before the next attempt, and when to forgive.

Full jitter (DESIGN.md §1: never the reference's fixed one-second storm): attempt *n* waits a delay
drawn uniformly from ``[0, min(reconnect_max_delay, reconnect_initial_delay * 2 ** (n - 1))]``.

*n* counts the failures since the last **stable** connection, not since the last open: a server
that accepts and closes at once (overloaded, or saying 1013 "Try Again Later") would otherwise see
every client come back within ``reconnect_initial_delay``, for ever. A connection is stable when
the server was still heard from (its last sign of life: any byte, its Close included)
``reconnect_stable_after`` seconds after the open, and it did not end with 1013; such an end
starts *n* again from 1. Every other end (a failed attempt, a close or a loss sooner, any 1013)
adds one to *n*, so the bound keeps doubling up to ``reconnect_max_delay``.
"""

from __future__ import annotations

import random

from ..config import ClientConfig
from ..wire.close_codes import TRY_AGAIN_LATER  # the server is overloaded: never come back sooner

__all__ = ["Backoff"]


class Backoff:
    """Counts attempts and failures, and draws each delay (``rng``: the client's, for replays)."""

    __slots__ = ("_config", "_failures", "_opened_at", "_retries", "_rng")

    def __init__(self, config: ClientConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        #: Failures since the last stable connection: the *n* of the delay's bound.
        self._failures = 0
        #: Attempts failed since the previous connection ended (``Opened.attempt``).
        self._retries = 0
        #: When the current connection opened; None while none is open.
        self._opened_at: float | None = None

    def opened(self, now: float) -> int:
        """A connection opened at ``now``: how many retries it took since the previous one ended.
        The failure count is kept: only a stable end forgives it (``failed``)."""
        retries, self._retries = self._retries, 0
        self._opened_at = now
        return retries

    def failed(self, code: int, last_seen: float) -> tuple[float, int]:
        """The current attempt or connection ended with ``code`` (1006 without a Close), the
        server last heard from at ``last_seen``: the delay before the next attempt, and its *n*."""
        config = self._config
        opened_at, self._opened_at = self._opened_at, None
        if (
            opened_at is not None
            and code != TRY_AGAIN_LATER
            and last_seen - opened_at >= config.reconnect_stable_after
        ):
            self._failures = 0
        self._failures += 1
        self._retries += 1
        bound = min(
            config.reconnect_max_delay,
            config.reconnect_initial_delay * 2 ** min(self._failures - 1, 60),
        )
        return self._rng.uniform(0.0, bound), self._failures
