"""The topic registry, kept in both directions: topic -> subscribers and connection -> topics.

No time, no bytes. A topic with no subscribers is removed at once, so nothing outlives its last
subscriber (PROTOCOL.md: unsubscribing from an unknown topic is a no-op; repeated subscribes are
idempotent). Subscriber maps keep insertion order, so fan-out order is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["TopicRegistry"]

S = TypeVar("S")


class TopicRegistry(Generic[S]):
    """Maps topics to subscribers (any hashable handle paired with a value, e.g. a connection)."""

    __slots__ = ("_by_conn", "_by_topic")

    def __init__(self) -> None:
        self._by_topic: dict[str, dict[int, S]] = {}
        self._by_conn: dict[int, set[str]] = {}

    def subscribe(self, conn_id: int, value: S, topic: str) -> bool:
        """Add ``conn_id`` to ``topic``; False if it was already there."""
        subscribers = self._by_topic.get(topic)
        if subscribers is None:
            subscribers = self._by_topic[topic] = {}
        elif conn_id in subscribers:
            return False
        subscribers[conn_id] = value
        self._by_conn.setdefault(conn_id, set()).add(topic)
        return True

    def unsubscribe(self, conn_id: int, topic: str) -> bool:
        """Remove ``conn_id`` from ``topic``; False if it was not subscribed."""
        subscribers = self._by_topic.get(topic)
        if subscribers is None or subscribers.pop(conn_id, None) is None:
            return False
        if not subscribers:
            del self._by_topic[topic]
        topics = self._by_conn[conn_id]
        topics.discard(topic)
        if not topics:
            del self._by_conn[conn_id]
        return True

    def remove_connection(self, conn_id: int) -> list[str]:
        """Forget every subscription of ``conn_id``; returns the topics it left, sorted."""
        topics = self._by_conn.pop(conn_id, None)
        if not topics:
            return []
        for topic in topics:
            subscribers = self._by_topic[topic]
            del subscribers[conn_id]
            if not subscribers:
                del self._by_topic[topic]
        return sorted(topics)

    def subscribers(self, topic: str) -> dict[int, S]:
        """The live subscriber map of ``topic`` (do not mutate); empty when none."""
        subscribers = self._by_topic.get(topic)
        return {} if subscribers is None else subscribers

    def count_of(self, conn_id: int) -> int:
        """How many topics ``conn_id`` holds."""
        return len(self._by_conn.get(conn_id, ()))

    def topics_of(self, conn_id: int) -> frozenset[str]:
        return frozenset(self._by_conn.get(conn_id, ()))

    def counts(self) -> dict[str, int]:
        """Topic -> number of subscribers."""
        return {topic: len(subs) for topic, subs in self._by_topic.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_topic)

    def __len__(self) -> int:
        return len(self._by_topic)

    def check(self) -> None:
        """Assert that both directions agree and no empty entry remains (for tests)."""
        for topic, subscribers in self._by_topic.items():
            assert subscribers, f"empty topic {topic!r} kept"
            for conn_id in subscribers:
                assert topic in self._by_conn.get(conn_id, ()), (topic, conn_id)
        for conn_id, topics in self._by_conn.items():
            assert topics, f"empty topic set kept for {conn_id}"
            for topic in topics:
                assert conn_id in self._by_topic.get(topic, {}), (topic, conn_id)

