"""A client's ``messages(topic)`` streams: their queues, their bookkeeping, the overflow policy.

docs/client.md ("``messages(topic)``: the stream") is the contract. Which streams each topic has is
``TopicStreams`` (held weakly, so a stream nobody references is forgotten). The **overflow policy**
is ``MessageStreamBase``'s: a stream holds at most ``max_queued`` unread messages; a message that
does not fit is dropped for that stream only and counted in ``dropped``, and one warning
(``OVERFLOW_WARNING``) marks the start of each overflow episode. ``MessageStream`` is the stream
every adapter hands out: a queue, and a ``Flag`` of the adapter's loop to wait on. No I/O.
"""

from __future__ import annotations

import abc
import logging
import weakref
from collections import deque
from collections.abc import Awaitable
from types import TracebackType
from typing import Protocol, Self

from ..errors import LocalProtocolError
from .notifications import MessageArrived

__all__ = [
    "MESSAGES_MAX_QUEUED",
    "OVERFLOW_WARNING",
    "Flag",
    "MessageStream",
    "MessageStreamBase",
    "StreamOwner",
    "TopicStreams",
    "check_max_queued",
]

logger = logging.getLogger("tank")

#: Default bound of each ``messages(topic)`` stream.
MESSAGES_MAX_QUEUED = 1000
#: Logged (logger ``tank``, warning) with the topic and ``max_queued`` when a stream starts dropping.
OVERFLOW_WARNING = "messages(%r) is full (%d unread): dropping messages for this stream"


def check_max_queued(max_queued: object) -> None:
    """``messages(topic, max_queued=...)`` takes an int > 0; anything else is the caller's mistake."""
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued <= 0:
        raise LocalProtocolError(f"max_queued must be an integer > 0, got {max_queued!r}")


class MessageStreamBase(abc.ABC):
    """What a ``MessageStream`` holds besides its queue: its topic, its bound, its ``dropped`` count,
    its end, ``async for`` / ``async with``, and the overflow bookkeeping.

    A stream implements ``__anext__`` and ``aclose`` (its way of waiting), ``_put`` (offer one
    message: on a full queue call ``_dropping()``, and log ``OVERFLOW_WARNING`` when it says so;
    once a message is queued call ``_accepting()``), and extends ``_end`` to wake its readers.
    """

    def __init__(self, topic: str, max_queued: int) -> None:
        self.topic = topic
        self.max_queued = max_queued
        #: Messages dropped because this stream was full.
        self.dropped = 0
        #: Also yield the outcome of each recovery (``MessageArrived.recovered``): asked for with
        #: ``messages(topic, recoveries=True)``.
        self.recoveries = False
        self._ended = False
        self._overflowing = False

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> MessageArrived:
        """The next message; ``StopAsyncIteration`` once the stream ended and is empty."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop receiving (the topic stays subscribed); queued messages are discarded."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def ended(self) -> bool:
        return self._ended

    @abc.abstractmethod
    def _put(self, message: MessageArrived) -> None:
        """Queue ``message`` unless the stream ended or is full (then drop it, see the class)."""

    def _end(self) -> None:
        """No more messages will come (the topic was unsubscribed, the client closed for good)."""
        self._ended = True

    def _dropping(self) -> bool:
        """A message did not fit: count it. True when this starts an overflow episode (warn once)."""
        self.dropped += 1
        starts = not self._overflowing
        self._overflowing = True
        return starts

    def _accepting(self) -> None:
        """A message was queued: an overflow episode, if any, is over."""
        self._overflowing = False


class TopicStreams:
    """The streams of each topic, held weakly: a stream nobody references any more is forgotten
    (breaking out of ``async for`` is enough)."""

    __slots__ = ("_by_topic",)

    def __init__(self) -> None:
        self._by_topic: dict[str, weakref.WeakSet[MessageStreamBase]] = {}

    def add(self, stream: MessageStreamBase) -> None:
        self._by_topic.setdefault(stream.topic, weakref.WeakSet()).add(stream)

    def discard(self, stream: MessageStreamBase) -> None:
        streams = self._by_topic.get(stream.topic)
        if streams is not None:
            streams.discard(stream)

    def deliver(self, message: MessageArrived) -> None:
        """Offer a topic message to every stream of its topic, in no particular order."""
        topic = message.topic
        streams = self._by_topic.get(topic) if topic is not None else None
        if streams:
            marker = message.recovered is not None
            for stream in list(streams):
                if not marker or stream.recoveries:
                    stream._put(message)

    def end_topic(self, topic: str) -> None:
        """The topic was unsubscribed: its streams end (after what they hold) and are forgotten."""
        for stream in list(self._by_topic.pop(topic, ())):
            stream._end()

    def end_all(self) -> None:
        """The client closed for good: every stream ends and is forgotten."""
        for streams in self._by_topic.values():
            for stream in list(streams):
                stream._end()
        self._by_topic.clear()


class Flag(Protocol):
    """A one-shot event of the adapter's loop (``asyncio.Event``, ``trio.Event``)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[object]: ...


class StreamOwner(Protocol):
    """What a ``MessageStream`` needs from its client (``client_session.ClientSession``)."""

    @property
    def _streams(self) -> TopicStreams: ...

    def _flag(self) -> Flag: ...

    async def _checkpoint_in(self) -> None: ...

    async def _checkpoint_out(self) -> None: ...


class MessageStream(MessageStreamBase):
    """``async for message in client.messages(topic)``: the messages of one topic, in order.

    Bounded: when ``max_queued`` messages wait unread, further ones are dropped for this stream
    (counted in ``dropped``, a warning on logger ``tank``); the client and the other consumers
    are unaffected. The stream ends when the topic is unsubscribed, the client closes for good,
    or ``aclose()`` is called; messages already queued are still delivered first (except after
    ``aclose()``).
    """

    def __init__(self, session: StreamOwner, topic: str, max_queued: int) -> None:
        super().__init__(topic, max_queued)
        self._session = session
        self._queue: deque[MessageArrived] = deque()
        self._wakeup: Flag | None = None

    async def __anext__(self) -> MessageArrived:
        session = self._session
        await session._checkpoint_in()
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            wakeup = self._wakeup = session._flag()
            await wakeup.wait()
        message = self._queue.popleft()
        await session._checkpoint_out()
        return message

    async def aclose(self) -> None:
        """Stop receiving (the topic stays subscribed); queued messages are discarded."""
        self._end()
        self._queue.clear()
        self._session._streams.discard(self)
        await self._session._checkpoint_out()

    def _put(self, message: MessageArrived) -> None:
        if self._ended:
            return
        if len(self._queue) >= self.max_queued:
            if self._dropping():
                logger.warning(OVERFLOW_WARNING, self.topic, self.max_queued)
            return
        self._accepting()
        self._queue.append(message)
        self._wake()

    def _end(self) -> None:
        super()._end()
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
