"""``tank_core.client.streams``: the streams of each topic and the overflow policy of one stream."""

from __future__ import annotations

import gc
from collections import deque

import pytest

from tank_core import LocalProtocolError
from tank_core.client import MessageArrived
from tank_core.client.streams import (
    MESSAGES_MAX_QUEUED,
    OVERFLOW_WARNING,
    MessageStreamBase,
    TopicStreams,
    check_max_queued,
)


class _Stream(MessageStreamBase):
    """A stream the way an adapter writes one, over a deque; it records its warnings."""

    def __init__(self, topic: str, max_queued: int = 2) -> None:
        super().__init__(topic, max_queued)
        self.queue: deque[MessageArrived] = deque()
        self.warnings: list[str] = []

    async def __anext__(self) -> MessageArrived:
        if not self.queue:
            raise StopAsyncIteration
        return self.queue.popleft()

    async def aclose(self) -> None:
        self._end()
        self.queue.clear()

    def _put(self, message: MessageArrived) -> None:
        if self._ended:
            return
        if len(self.queue) >= self.max_queued:
            if self._dropping():
                self.warnings.append(OVERFLOW_WARNING % (self.topic, self.max_queued))
            return
        self._accepting()
        self.queue.append(message)


def _message(topic: str | None, n: int = 0) -> MessageArrived:
    return MessageArrived(text=str(n), topic=topic, data=n)


def test_max_queued_must_be_a_positive_int() -> None:
    assert MESSAGES_MAX_QUEUED == 1000
    check_max_queued(1)
    for bad in (0, -1, True, 1.5, "3", None):
        with pytest.raises(LocalProtocolError, match="max_queued must be an integer > 0"):
            check_max_queued(bad)


def test_a_full_stream_drops_counts_and_warns_once_per_episode() -> None:
    stream = _Stream("news", max_queued=2)
    for n in range(5):
        stream._put(_message("news", n))
    assert [m.data for m in stream.queue] == [0, 1]
    assert stream.dropped == 3
    assert stream.warnings == ["messages('news') is full (2 unread): dropping messages for this stream"]
    stream.queue.popleft()
    stream._put(_message("news", 5))  # room again: the episode is over
    stream._put(_message("news", 6))  # a new episode: a new warning
    assert stream.dropped == 4
    assert len(stream.warnings) == 2


def test_an_ended_stream_takes_nothing_and_async_with_closes_it() -> None:
    stream = _Stream("news")
    assert not stream.ended
    stream._end()
    stream._put(_message("news"))
    assert stream.ended and not stream.queue and stream.dropped == 0

    async def use() -> list[object]:
        async with _Stream("t") as s:
            s._put(_message("t", 1))
            got = [m.data async for m in s]
        assert s.ended
        return got

    coro = use()
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    assert stop.value.value == [1]


def test_topic_streams_deliver_to_every_stream_of_the_topic_only() -> None:
    streams = TopicStreams()
    a1, a2, b = _Stream("a"), _Stream("a"), _Stream("b")
    for s in (a1, a2, b):
        streams.add(s)
    streams.deliver(_message("a", 1))
    streams.deliver(_message(None, 2))
    streams.deliver(_message("c", 3))
    assert [m.data for m in a1.queue] == [m.data for m in a2.queue] == [1]
    assert not b.queue
    streams.discard(a2)
    streams.discard(_Stream("never added"))
    streams.deliver(_message("a", 4))
    assert [m.data for m in a1.queue] == [1, 4]
    assert [m.data for m in a2.queue] == [1]


def test_end_topic_ends_its_streams_and_end_all_ends_every_one() -> None:
    streams = TopicStreams()
    a, b = _Stream("a"), _Stream("b")
    streams.add(a)
    streams.add(b)
    streams.end_topic("a")
    streams.end_topic("not held")
    assert a.ended and not b.ended
    streams.deliver(_message("a"))
    assert not a.queue
    streams.end_all()
    assert b.ended
    late = _Stream("b")
    streams.add(late)
    streams.deliver(_message("b", 7))
    assert [m.data for m in late.queue] == [7]


def test_a_stream_nobody_references_is_forgotten() -> None:
    streams = TopicStreams()
    kept = _Stream("a")
    streams.add(kept)
    streams.add(_Stream("a"))
    gc.collect()
    streams.deliver(_message("a", 1))
    assert [m.data for m in kept.queue] == [1]
    assert len(streams._by_topic["a"]) == 1
