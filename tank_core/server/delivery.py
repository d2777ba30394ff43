"""The engine's deliveries: publish, broadcast and send to one connection or one user, each
rendered once; the outbox accounting (PROTOCOL.md, Limits: past ``max_outbox_bytes`` a connection is
closed 1008 ``slow consumer``, and the others are not delayed).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..actions import (
    EngineAction,
    SendText,
    SendTextToEach,
)
from ..errors import LocalProtocolError
from ..notifications import (
    SlowConsumerClosed,
)
from ..wire import close_codes
from ..wire.codec import (
    render_topic_message,
)
from ..wire.recovery import render_numbered
from .engine_state import ConnectionRecord, EngineState, encode_text

__all__ = ["EngineDelivery"]


class EngineDelivery(EngineState):
    """Sending: what is queued for whom, and what that costs each outbox."""

    def flushed(self, conn_id: int, nbytes: int) -> None:
        """The transport wrote ``nbytes`` of ``conn_id``'s queued data messages."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            left = conn.outbox - nbytes
            conn.outbox = left if left > 0 else 0

    def publish(
        self, topic: str, data: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``{"topic":T,"data":D}`` to every subscriber of ``topic``; returns how many.
        With ``ServerConfig.history``, the publication is kept and numbered first."""
        payload = self.render_publish(topic, data)
        if self.history is None:
            return self.publish_rendered(topic, payload, now=now, wall_time=wall_time)
        numbered = self.history.record(topic, data, now=self._advance(now), wall_time=wall_time)
        if numbered is None or not self._recovering:
            return self.publish_rendered(topic, payload, now=now, wall_time=wall_time)
        # Subscribers that agreed the recovery extension get the publication with its offset
        # (wire/recovery.py); the others the reference's frame, byte for byte.
        subscribers = self._topics.subscribers(topic)
        if not subscribers:
            return 0, []
        plain = [c for c in subscribers.values() if not c.recovery]
        opted = [c for c in subscribers.values() if c.recovery]
        actions: list[EngineAction] = []
        delivered = self._fan_out(payload, plain, actions, wall_time) if plain else 0
        epoch, offset = numbered
        delivered += self._fan_out(
            render_numbered(topic, data, epoch, offset), opted, actions, wall_time
        )
        return delivered, actions

    @staticmethod
    def render_publish(topic: str, data: str) -> bytes:
        """The text ``publish`` sends (``LocalProtocolError`` unless both are str)."""
        if not isinstance(topic, str):
            raise LocalProtocolError(f"topic must be a str, got {type(topic).__name__}")
        if not isinstance(data, str):
            raise LocalProtocolError(f"data must be a str, got {type(data).__name__}")
        return render_topic_message(topic, data)

    def publish_rendered(
        self, topic: str, payload: bytes, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``publish`` with the envelope already rendered (encode once, e.g. by a broker)."""
        self._advance(now)
        subscribers = self._topics.subscribers(topic)
        if not subscribers:
            return 0, []
        actions: list[EngineAction] = []
        delivered = self._fan_out(payload, subscribers.values(), actions, wall_time)
        return delivered, actions

    def broadcast(
        self, text: str, *, exclude: int | None = None, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``text`` to every open connection (but ``exclude``); returns how many."""
        return self.broadcast_rendered(
            encode_text(text, "broadcast text"), exclude=exclude, now=now, wall_time=wall_time
        )

    def broadcast_rendered(
        self, payload: bytes, *, exclude: int | None = None, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``broadcast`` with the text already UTF-8 (from another node, say)."""
        self._advance(now)
        actions: list[EngineAction] = []
        recipients: Iterable[ConnectionRecord] = self._open.values()
        if exclude is not None:
            recipients = (c for c in self._open.values() if c.conn_id != exclude)
        delivered = self._fan_out(payload, recipients, actions, wall_time)
        return delivered, actions

    def send(self, conn_id: int, text: str, *, now: float, wall_time: float) -> list[EngineAction]:
        """Send ``text`` to one open connection."""
        payload = encode_text(text, "text")
        conn = self._require_open(conn_id)
        self._advance(now)
        actions: list[EngineAction] = []
        self._send_one(conn, payload, actions, wall_time)
        return actions

    def send_to_user(
        self, user_id: str, text: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Send ``text`` to every open connection of ``user_id``; returns how many."""
        return self.send_to_user_rendered(
            user_id, encode_text(text, "text"), now=now, wall_time=wall_time
        )

    def send_to_user_rendered(
        self, user_id: str, payload: bytes, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Like ``send_to_user`` with the text already UTF-8."""
        self._advance(now)
        actions: list[EngineAction] = []
        conns = list(self._by_user.get(user_id, {}).values())
        delivered = self._fan_out(payload, conns, actions, wall_time)
        return delivered, actions

    def _send_one(
        self,
        conn: ConnectionRecord,
        payload: bytes,
        actions: list[EngineAction],
        wall_time: float,
        *,
        force: bool = False,
    ) -> None:
        size = len(payload) + self._overhead(len(payload))
        if not force and conn.outbox + size > self.config.max_outbox_bytes:
            self._slow_consumer(conn, actions, wall_time)
            return
        conn.outbox += size
        self.messages_out += 1
        actions.append(SendText(conn_id=conn.conn_id, payload=payload))

    def _fan_out(
        self,
        payload: bytes,
        recipients: Iterable[ConnectionRecord],
        actions: list[EngineAction],
        wall_time: float,
    ) -> int:
        """Queue ``payload`` to each recipient that can take it; close those that cannot."""
        size = len(payload) + self._overhead(len(payload))
        room = self.config.max_outbox_bytes - size
        targets: list[int] = []
        slow: list[ConnectionRecord] = []
        for conn in recipients:
            if conn.outbox > room:
                slow.append(conn)
            else:
                conn.outbox += size
                targets.append(conn.conn_id)
        if targets:
            self.messages_out += len(targets)
            actions.append(SendTextToEach(conn_ids=tuple(targets), payload=payload))
        for conn in slow:
            self._slow_consumer(conn, actions, wall_time)
        return len(targets)

    def _slow_consumer(
        self, conn: ConnectionRecord, actions: list[EngineAction], wall_time: float
    ) -> None:
        # PROTOCOL.md, Limits: close 1008 "slow consumer"; the others are not delayed.
        self.slow_consumer_closes += 1
        actions.append(
            SlowConsumerClosed(
                conn_id=conn.conn_id, user_id=conn.user_id, outbox_bytes=conn.outbox,
                wall_time=wall_time,
            )
        )
        self._start_close(
            conn, close_codes.POLICY_VIOLATION, "slow consumer", True, self._now, actions
        )
