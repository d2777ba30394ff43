"""One heap of deadlines for every connection, with lazy invalidation; knows nothing of WebSocket.

Each key (a connection id) has at most one live entry; re-registering or forgetting a key only marks
the old entry stale, and stale entries are skipped when they reach the top. The top is kept live after
every change, so ``earliest()`` is an exact, side-effect-free query. The heap is rebuilt when it holds
more than twice the live entries plus 1000 (trio's ``Deadlines`` does the same).
"""

from __future__ import annotations

import heapq

__all__ = ["Deadlines"]


class Deadlines:
    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        #: key -> (when, seq) of its one live entry.
        self._live: dict[int, tuple[float, int]] = {}
        self._seq = 0

    def set(self, key: int, when: float) -> None:
        """Make ``when`` the one deadline of ``key`` (replacing any earlier registration)."""
        current = self._live.get(key)
        if current is not None and current[0] == when:
            return
        self._seq += 1
        self._live[key] = (when, self._seq)
        heapq.heappush(self._heap, (when, self._seq, key))
        self._tidy()

    def discard(self, key: int) -> None:
        """Forget ``key``'s deadline, if any."""
        if self._live.pop(key, None) is not None:
            self._tidy()

    def get(self, key: int) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def earliest(self) -> float | None:
        """The earliest live deadline, or None. Pure."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[int, float]]:
        """Remove and return every (key, deadline) due by ``now``, earliest first."""
        heap = self._heap
        due: list[tuple[int, float]] = []
        while heap and heap[0][0] <= now:
            when, _seq, key = heapq.heappop(heap)
            del self._live[key]
            due.append((key, when))
            self._drop_stale_top()
        return due

    def __len__(self) -> int:
        return len(self._live)

    def items(self) -> list[tuple[int, float]]:
        """Every live (key, deadline), for tests and oracles."""
        return [(key, when) for key, (when, _seq) in self._live.items()]

    def _drop_stale_top(self) -> None:
        heap = self._heap
        live = self._live
        while heap:
            _when, seq, key = heap[0]
            entry = live.get(key)
            if entry is not None and entry[1] == seq:
                return
            heapq.heappop(heap)

    def _tidy(self) -> None:
        self._drop_stale_top()
        if len(self._heap) > 2 * len(self._live) + 1000:
            self._heap = [(when, seq, key) for key, (when, seq) in self._live.items()]
            heapq.heapify(self._heap)
