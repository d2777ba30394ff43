"""The broker link's publishing: envelopes written to the publishing connection, bounded in flight,
an outage buffer while Redis is away, each answer judged by the membership count (``PUBSUB NUMSUB
{prefix}:all``) that Redis gave just before it in the same pipeline: ``up``, ``partial``, ``down``.
"""

from __future__ import annotations

from .envelope import (
    encode_envelope,
)
from .interest import LinkInterest
from .link_base import (
    DOWN,
    MAX_IN_FLIGHT_BYTES,
    MAX_SEQUENCE_CHANNELS,
    MEMBERSHIP_POLL,
    PARTIAL,
    REPLY_HANDSHAKE,
    REPLY_NUMSUB,
    UP,
    ConnStatus,
    LinkState,
    PendingCommand,
)
from .resp import Reply, RespError, encode_command, encode_publish
from .vocabulary import BrokerWrite

__all__ = ["LinkPublishing"]


class LinkPublishing(LinkInterest):
    """What this node sends to the others, and what it is told of it."""

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        kind: bytes,
        channel: bytes,
        payload: bytes,
        *,
        exclude: int | None = None,
        token: int | None = None,
        now: float,
    ) -> bool:
        """Send one message to the other nodes (after local delivery, which is the caller's).

        True when ``token`` will come back from ``take_answers`` (the link is up: answered ``up`` or
        ``partial`` once Redis acknowledged it, ``down`` if given up); False when the link is not up
        (the message waits in the outage buffer, if it fits: the caller says at once that other
        nodes were not reached).
        """
        now = self._advance(now)
        if self.state is LinkState.CLOSED:
            return False
        seq = self._seq.get(channel, 0) + 1
        if seq == 1 and len(self._seq) >= MAX_SEQUENCE_CHANNELS:
            self._new_epoch()
        self._seq[channel] = seq
        envelope = encode_envelope(kind, self._origin, seq, exclude, payload)
        up = self.state is LinkState.UP
        item = PendingCommand(encode_publish(channel, envelope), token if up else None)
        if up and not self._queue and self._has_room(len(item.command)):
            self._write_publish(item, now)
        else:
            self._queue.append(item)
            self._queued_bytes += len(item.command)
            self._trim_queue()
        return up and token is not None

    def take_answers(self) -> list[tuple[int, str]]:
        """(token, ``up``/``partial``/``down``) for publishes answered since the last call."""
        answers = self._answers
        if not answers:
            return answers
        self._answers = []
        return answers

    def take_writes(self) -> list[BrokerWrite]:
        """Everything to write since the last call, one ``BrokerWrite`` per connection; pending
        subscription changes become SUBSCRIBE/UNSUBSCRIBE commands here, batched."""
        if self._sub.status is ConnStatus.OPEN and (self._pending_sub or self._pending_unsub):
            for pending, command in (
                (self._pending_unsub, b"UNSUBSCRIBE"),
                (self._pending_sub, b"SUBSCRIBE"),
            ):
                if pending:
                    channels = list(pending)
                    pending.clear()
                    for channel in channels:
                        # A channel left, or joined again, starts a new sequence history.
                        self._in_seq.pop(channel, None)
                        self._in_seq_before.pop(channel, None)
                    self._write_batches(command, channels)
        writes: list[BrokerWrite] = []
        for conn in (self._sub, self._pub):
            if conn.out:
                data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
                conn.out = []
                writes.append(BrokerWrite(role=conn.role, generation=self.generation, data=data))
        return writes

    # ------------------------------------------------------------------ internals: publishing

    def _on_pub_reply(self, reply: Reply, now: float) -> str | None:
        if not self._pub_expect:
            return f"unexpected reply from Redis: {reply!r}"[:200]
        item = self._pub_expect.popleft()
        if item.kind == REPLY_HANDSHAKE:  # AUTH or SELECT
            if isinstance(reply, RespError):
                return f"Redis refused: {reply}"
            return None
        if item.kind == REPLY_NUMSUB:
            self._numsub_pending = False
            if type(reply) is not list or len(reply) != 2 or type(reply[1]) is not int:
                return f"unexpected reply to PUBSUB NUMSUB: {reply!r}"[:200]
            self._counted(reply[1], now)
            return None
        self._in_flight_bytes -= len(item.command)
        if isinstance(reply, RespError):
            self.dropped += 1  # e.g. -OOM: Redis will not take it; retrying would not help
            answer = DOWN
        else:
            self.published += 1
            members = self.members
            answer = UP if members is not None and members >= self.expected_members else PARTIAL
        if item.token is not None:
            self._answers.append((item.token, answer))
        return None

    def _ask_members(self, now: float) -> None:
        command = encode_command((b"PUBSUB", b"NUMSUB", self.channels.all))
        self._write_query(command, REPLY_NUMSUB, now)
        self._numsub_pending = True

    def _counted(self, members: int, now: float) -> None:
        """Redis counted ``members`` nodes on {prefix}:all (ourselves included)."""
        self.members = members
        if members >= self.expected_members:
            self.expected_members = members
            self._short_since = None
        elif self._short_since is None:
            self._short_since = now
        elif now - self._short_since >= self.config.rejoin_grace:
            self.expected_members = max(1, members)  # gone for good: stop waiting for them
            self._short_since = None
        # Ask again soon while nodes are missing, so "partial" ends as soon as they are back.
        short = members < self.expected_members
        self._numsub_due = now + (MEMBERSHIP_POLL if short else self.config.probe_interval)

    def _write_query(self, command: bytes, kind: int, now: float) -> None:
        item = PendingCommand(command, None, kind)
        item.sent_at = now
        self._pub.out.append(command)
        self._pub_expect.append(item)

    def _has_room(self, size: int) -> bool:
        expect = self._pub_expect
        return len(expect) < self.config.max_in_flight and (
            not expect or self._in_flight_bytes + size <= MAX_IN_FLIGHT_BYTES
        )

    def _write_publish(self, item: PendingCommand, now: float) -> None:
        item.sent_at = now
        self._pub.out.append(item.command)
        self._pub_expect.append(item)
        self._in_flight_bytes += len(item.command)

    def _pump_queue(self, now: float) -> None:
        queue = self._queue
        while queue and self._has_room(len(queue[0].command)):
            item = queue.popleft()
            self._queued_bytes -= len(item.command)
            self._write_publish(item, now)

    def _trim_queue(self) -> None:
        queue = self._queue
        config = self.config
        while queue and (
            len(queue) > config.max_buffered or self._queued_bytes > config.max_buffered_bytes
        ):
            item = queue.popleft()
            self._queued_bytes -= len(item.command)
            self.dropped += 1
            if item.token is not None:
                self._answers.append((item.token, DOWN))

    def _answer_queued_down(self) -> None:
        for item in self._queue:
            if item.token is not None:
                self._answers.append((item.token, DOWN))
                item.token = None

    def _new_epoch(self) -> None:
        self._seq.clear()
        self._epoch += 1
        self._origin = f"{self.node_id}.{self._epoch}".encode()
