"""A clock for tests: monotonic time that moves only when told, and wall time as data."""

from __future__ import annotations

import random

__all__ = ["FakeClock"]

_WALL_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: wall time is data, fixed for replayable traces


class FakeClock:
    """A monotonic clock that moves only when told; starts at a random large offset by default
    (as trio's SystemClock does) so code that assumes the clock starts at 0 fails loudly."""

    def __init__(self, start: float | None = None, *, seed: int | None = None) -> None:
        if start is None:
            start = 10_000.0 + random.Random(seed).random() * 1_000_000.0
        self.now = float(start)
        self._origin = self.now

    @property
    def wall_time(self) -> float:
        return _WALL_EPOCH + (self.now - self._origin)

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        return self.now

    def jump_to(self, when: float) -> float:
        if when > self.now:
            self.now = when
        return self.now
