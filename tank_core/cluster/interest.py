"""The broker link's subscriptions: the channels this node wants (interest routing: topics and
user ids with local connections, and ``{prefix}:all``), SUBSCRIBE/UNSUBSCRIBE in batches, Redis's
confirmations, and the messages other nodes send, checked against each origin's sequence (a skip is
a gap, a repeat a duplicate).
"""

from __future__ import annotations

from ..notifications import BrokerGap
from .envelope import (
    LEAVE,
    decode_envelope,
)
from .link_base import (
    ALLOWED_KINDS,
    CHANNEL_TOPIC,
    CHANNEL_USER,
    MAX_ORIGINS_PER_CHANNEL,
    SUBSCRIBE_BATCH,
    ConnStatus,
    Inbound,
    LinkBase,
    LinkOutput,
)
from .resp import Reply, RespError, encode_command

__all__ = ["LinkInterest"]


class LinkInterest(LinkBase):
    """What this node listens to, and what it hears."""

    # ------------------------------------------------------------------ interest (from the engine)

    def topic_added(self, topic: str) -> None:
        """``topic`` got its first local subscriber."""
        self._want_add(self.channels.topic(topic), (CHANNEL_TOPIC, topic))

    def topic_removed(self, topic: str) -> None:
        """``topic`` lost its last local subscriber."""
        self._want_remove(self.channels.topic(topic))

    def user_added(self, user_id: str) -> None:
        """The first local connection of ``user_id`` opened."""
        self._want_add(self.channels.user(user_id), (CHANNEL_USER, user_id))

    def user_removed(self, user_id: str) -> None:
        """The last local connection of ``user_id`` closed."""
        self._want_remove(self.channels.user(user_id))

    # ------------------------------------------------------------------ internals: subscriptions

    def _want_add(self, channel: bytes, target: tuple[bytes, str]) -> None:
        if channel in self._want:
            return
        self._want[channel] = target
        if self._sub.status is ConnStatus.OPEN:
            if channel in self._pending_unsub:
                del self._pending_unsub[channel]  # never left: Redis still has it
            else:
                self._pending_sub[channel] = None

    def _want_remove(self, channel: bytes) -> None:
        if self._want.pop(channel, None) is None:
            return
        if self._sub.status is ConnStatus.OPEN:
            if channel in self._pending_sub:
                del self._pending_sub[channel]  # never sent
            else:
                self._pending_unsub[channel] = None

    def _write_batches(self, command: bytes, channels: list[bytes]) -> None:
        out = self._sub.out
        for start in range(0, len(channels), SUBSCRIBE_BATCH):
            out.append(encode_command([command, *channels[start : start + SUBSCRIBE_BATCH]]))

    def _on_sub_reply(self, reply: Reply, wall_time: float, out: list[LinkOutput]) -> str | None:
        if type(reply) is list and reply:
            kind = reply[0]
            # Redis is a peer too (DESIGN.md §4): a channel that is not a bulk string is garbage.
            if kind == b"message" and len(reply) == 3 and type(reply[1]) is bytes:
                self._on_message(reply[1], reply[2], wall_time, out)
                return None
            if (kind == b"subscribe" or kind == b"unsubscribe") and len(reply) == 3:
                if type(reply[1]) is not bytes:
                    return "unexpected push from Redis: a channel that is not a string"
                self._awaiting_confirm.discard(reply[1])
                return None
            if kind == b"pong":
                self._ping_deadline = None
                return None
            return f"unexpected push from Redis: {kind!r}"
        if isinstance(reply, RespError):
            return f"Redis refused: {reply}"
        if self._sub_handshake and reply == b"OK":
            self._sub_handshake -= 1
            return None
        return f"unexpected reply from Redis: {reply!r}"[:200]

    def _on_message(
        self, channel: bytes, data: bytes, wall_time: float, out: list[LinkOutput]
    ) -> None:
        target = self._want.get(channel)
        if target is None:
            return  # in flight while we unsubscribed: nobody here wants it any more
        envelope = decode_envelope(data) if type(data) is bytes else None
        if envelope is None:
            self.bad_envelopes += 1
            return
        kind, origin, seq, _exclude, payload = envelope
        if origin == self._origin or origin.split(b".", 1)[0] == self._own_prefix:
            return  # our own echo (of any epoch): delivered locally before it was published
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            # PROTOCOL.md: every frame we send is valid text; another node's garbage is dropped.
            self.bad_envelopes += 1
            return
        channel_kind, key = target
        if kind not in ALLOWED_KINDS[channel_kind]:
            self.bad_envelopes += 1
            return
        origins = self._in_seq.get(channel)
        if origins is None:
            origins = self._in_seq[channel] = {}
        last = origins.get(origin)
        if last is None:
            before = self._in_seq_before.get(channel)
            previous = None if before is None else before.get(origin)
            if previous is not None and seq <= previous:
                self.duplicates += 1
                return
            if len(origins) >= MAX_ORIGINS_PER_CHANNEL:
                origins.clear()
        elif seq <= last:
            self.duplicates += 1
            return
        elif seq != last + 1:
            missed = seq - last - 1
            self.gaps += 1
            self.missed += missed
            out.append(
                BrokerGap(
                    origin=origin.decode("ascii", "replace"),
                    channel=channel.decode("utf-8", "replace"),
                    missed=missed,
                    wall_time=wall_time,
                )
            )
        origins[origin] = seq
        if kind == LEAVE:
            # A node shutting down: do not wait rejoin_grace for it.
            if self.expected_members > 1:
                self.expected_members -= 1
            return
        self.received_messages += 1
        out.append(Inbound(kind=kind, key=key, payload=payload))
