"""The engine's side of the recovery extension (``wire/recovery.py``): ``recover:`` subscribes and
replays what the client missed from the topic's history, then says whether that was all of it.

Why nothing is lost or doubled: the subscription and the snapshot of the history happen in the
same call, so every publication is either in the snapshot (offset up to the one the ``recovered``
message names) or published after it to the new subscriber; and a replay is only sent when the
history holds every offset after the client's (``HistoryRead.complete``).
"""

from __future__ import annotations

import sys

from ..actions import EngineAction
from ..wire.recovery import render_numbered, render_recovered
from .engine_state import ConnectionRecord, ConnectionState
from .liveness import EngineLiveness

__all__ = ["EngineReplay"]


class EngineReplay(EngineLiveness):
    """The replays ``recover:`` starts (the command itself is ``Engine._recover``)."""

    def _replay(
        self,
        conn: ConnectionRecord,
        topic: str,
        epoch: str | None,
        offset: int | None,
        actions: list[EngineAction],
        wall_time: float,
    ) -> None:
        """What followed ``offset`` of ``epoch`` on ``topic``, then the ``recovered`` message
        (``offset`` None: nothing to replay, only where the topic stands)."""
        history = self.history
        if history is None:
            # No history is kept: a first subscription has nothing to recover, any other
            # recovery cannot be vouched for.
            self._send_one(conn, render_recovered(topic, "", 0, offset is None), actions, wall_time)
            return
        if offset is None:
            read = history.read(topic, since=None, epoch=None, limit=0, now=self._now)
        else:
            read = history.read(topic, since=offset, epoch=epoch, limit=sys.maxsize, now=self._now)
        if read.complete:
            for publication in read.publications:
                frame = render_numbered(topic, publication.data, read.epoch, publication.offset)
                self._send_one(conn, frame, actions, wall_time)
                if conn.state is not ConnectionState.OPEN:
                    return  # a slow consumer: closed on the way
        self._send_one(
            conn, render_recovered(topic, read.epoch, read.offset, read.complete), actions,
            wall_time,
        )
