"""Each topic's recent publications, numbered: offsets that grow by one, in an epoch.

A topic's offsets count its publications (the first is 1) within an epoch; a new epoch starts
whenever the numbering could not go on: the process started, or the topic was forgotten to keep
within ``History.max_topics``. So (epoch, offset) names one publication for good, and a reader
who has everything up to offset O of epoch E can always tell whether what it is given next
continues it: ``HistoryRead.complete``. Publications leave by count and by age
(``HistoryPolicy``), checked whenever the topic is written or read (no timer).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from ..history import History, HistoryPolicy

__all__ = ["HistoryRead", "HistoryStore", "Publication"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    """One kept publication of a topic."""

    offset: int
    data: str
    #: Wall-clock seconds since the epoch when it was published (for people, not for ordering).
    wall_time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryRead:
    """What a reader gets: publications after ``since``, oldest first, and whether they continue
    what it had."""

    topic: str
    #: The topic's epoch ("" when the topic has no offsets yet).
    epoch: str
    #: The latest offset given in that epoch (0: none yet).
    offset: int
    publications: tuple[Publication, ...]
    #: True when nothing between the reader's offset and the first publication returned is
    #: missing, in the same epoch; False when history cannot vouch for that (too old, another
    #: epoch, an offset never given): the reader must reload its state.
    complete: bool
    #: More publications follow the ones returned (ask again from the last one's offset).
    more: bool


class _TopicLog:
    __slots__ = ("entries", "epoch", "last_offset", "policy")

    def __init__(self, epoch: str, policy: HistoryPolicy) -> None:
        self.epoch = epoch
        self.policy = policy
        self.last_offset = 0
        #: (offset, monotonic time, publication)
        self.entries: deque[tuple[float, Publication]] = deque()

    def expire(self, now: float) -> None:
        entries = self.entries
        oldest = now - self.policy.ttl
        while entries and entries[0][0] < oldest:
            entries.popleft()


class HistoryStore:
    """The history of every topic with a policy (see the module header)."""

    def __init__(self, config: History, node: str) -> None:
        self.config = config
        self._node = node
        self._epochs = 0
        self._logs: OrderedDict[str, _TopicLog] = OrderedDict()
        #: Topics forgotten so far (``max_topics``): a topic's history may then have begun
        #: before its current epoch, so "from before the first publication" vouches for nothing.
        self._forgotten = 0

    @property
    def topics(self) -> int:
        """Topics whose offsets are remembered."""
        return len(self._logs)

    @property
    def publications(self) -> int:
        """Publications kept, over all topics (some may be past their age until next looked at)."""
        return sum(len(log.entries) for log in self._logs.values())

    def record(self, topic: str, data: str, *, now: float, wall_time: float) -> tuple[str, int] | None:
        """Keep one publication of ``topic``: its (epoch, offset), or None when the topic keeps
        no history."""
        log = self._logs.get(topic)
        if log is None:
            policy = self.config.policy_for(topic)
            if policy is None:
                return None
            if len(self._logs) >= self.config.max_topics:
                self._logs.popitem(last=False)  # the least recently published topic
                self._forgotten += 1
            self._epochs += 1
            log = self._logs[topic] = _TopicLog(f"{self._node}-{self._epochs}", policy)
        else:
            self._logs.move_to_end(topic)
        log.last_offset += 1
        publication = Publication(offset=log.last_offset, data=data, wall_time=wall_time)
        log.entries.append((now, publication))
        if len(log.entries) > log.policy.size:
            log.entries.popleft()
        log.expire(now)
        return log.epoch, log.last_offset

    def read(
        self, topic: str, *, since: int | None, epoch: str | None, limit: int, now: float
    ) -> HistoryRead:
        """Up to ``limit`` publications of ``topic`` after offset ``since`` of ``epoch``, oldest
        first; with ``since`` None, the latest ``limit`` of them. Without ``epoch`` the offsets
        are taken as this epoch's, but ``complete`` cannot be vouched for."""
        log = self._logs.get(topic)
        if log is None:
            # "" is the epoch before the first publication: from offset 0 of it, nothing is
            # missing yet.
            fresh = since == 0 and epoch == "" and not self._forgotten
            return HistoryRead(topic=topic, epoch="", offset=0, publications=(),
                               complete=since is None or fresh, more=False)
        log.expire(now)
        kept = [publication for _at, publication in log.entries]
        if since is None:
            chosen = kept[-limit:] if limit > 0 else []
            return HistoryRead(topic=topic, epoch=log.epoch, offset=log.last_offset,
                               publications=tuple(chosen), complete=True, more=False)
        first = kept[0].offset if kept else log.last_offset + 1
        # Nothing is missing when the reader is in this epoch, has not claimed an offset never
        # given, and the first kept publication comes right after what it has (or none came).
        if epoch == "" and since == 0 and not self._forgotten:
            # A reader from before the topic's first publication: the epoch that began since
            # is its own, from offset 0.
            epoch = log.epoch
        complete = epoch == log.epoch and since <= log.last_offset and since >= first - 1
        if epoch is None or epoch == log.epoch:
            after = [publication for publication in kept if publication.offset > since]
        else:
            after = kept  # another epoch's offsets mean nothing here: all that is kept
        return HistoryRead(topic=topic, epoch=log.epoch, offset=log.last_offset,
                           publications=tuple(after[:limit]), complete=complete,
                           more=len(after) > limit)
