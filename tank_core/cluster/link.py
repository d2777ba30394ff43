"""The Redis broker link as a sans-IO state machine: two connections, interest routing, outages.

One link per node (DESIGN.md §5, docs/scale-out.md). It asks the adapter to open two TCP
connections to Redis (``BrokerConnect``): the *subscriber* sits in subscribe mode, the *publisher*
sends PUBLISH and reads its integer replies, which acknowledge each message in order. Two plain RESP2
connections keep Redis's replies and pushes apart without RESP3, and a burst of publishes never
delays the liveness probe.

- **Interest routing.** The engine reports topics and user ids gaining their first local
  connection or losing their last (``topic_added`` ...). The link keeps the wanted channel set and,
  at the end of each server call, writes SUBSCRIBE/UNSUBSCRIBE for the difference, 512 channels per
  command. ``{prefix}:all`` is always wanted.
- **Up.** After (re)connecting, every wanted channel is subscribed again; once Redis has confirmed
  them all and the publisher's AUTH/SELECT are answered, ``BrokerUp`` is emitted and the outage
  buffer is sent, in order.
- **Down.** EOF, an error, garbage, a PING or PUBLISH left unanswered for ``probe_timeout``: both
  connections are dropped, ``BrokerDown(reason)`` is emitted once, and the next attempt starts after
  a delay drawn uniformly from [0, bound] (full jitter), the bound doubling from
  ``reconnect_initial_delay`` up to ``reconnect_max_delay``. Publishes written and not acknowledged
  go back to the front of the outage buffer; later ones join it; past its bounds the oldest are
  dropped and counted.
- **Membership.** Every node subscribes ``{prefix}:all`` (last, after its other channels), so
  ``PUBSUB NUMSUB {prefix}:all`` counts the nodes that hear everything. The link asks on the
  publishing connection (every ``probe_interval``, every 50 ms while nodes are missing), so each
  PUBLISH reply is judged by the count Redis gave just before it in the same pipeline: ``up`` when
  every node known before is back, ``partial`` while some are missing (they miss this message),
  ``down`` when Redis did not take it. A node missing for ``rejoin_grace`` is no longer expected;
  one shutting down says so (an ``l`` envelope) and is not waited for.
- **Receiving.** Our own messages come back from Redis: dropped by origin id (we delivered them
  locally first). Others are checked against the origin's per-channel sequence: a skip is a gap
  (``BrokerGap``, counted), a repeat a duplicate (dropped, counted: a publish re-sent after a
  reconnect that Redis had already delivered).

Time enters as ``now``; ``next_deadline()`` is pure; nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from ..config import BrokerConfig
from ..errors import LocalProtocolError
from ..notifications import BrokerDown, BrokerGap, BrokerUp
from .envelope import (
    BROADCAST,
    DISCONNECT,
    LEAVE,
    PUBLISH,
    RELAY,
    SEND,
    Channels,
    decode_envelope,
    encode_envelope,
)
from .resp import Reply, RespError, RespParser, RespProtocolError, encode_command, encode_publish
from .vocabulary import BrokerClose, BrokerConnect, BrokerRole, BrokerWrite

__all__ = ["BrokerLink", "Inbound", "LinkOutput", "LinkState"]

#: Channels per SUBSCRIBE / UNSUBSCRIBE command.
SUBSCRIBE_BATCH = 512
#: Bytes of PUBLISH commands written and not yet answered, beside ``max_in_flight``.
MAX_IN_FLIGHT_BYTES = 8 * 1_048_576
#: Outbound sequence counters kept before starting afresh under a new origin id.
MAX_SEQUENCE_CHANNELS = 100_000
#: Origins remembered per channel for gap and duplicate checks.
MAX_ORIGINS_PER_CHANNEL = 256
#: Seconds between membership queries while nodes known before are missing.
MEMBERSHIP_POLL = 0.05

#: What a publish achieved: Redis took it and every known node heard it; Redis took it but nodes
#: known before have not come back yet; Redis did not take it (other nodes not reached).
UP, PARTIAL, DOWN = "up", "partial", "down"

SUB = BrokerRole.SUBSCRIBER
PUB = BrokerRole.PUBLISHER

_TOPIC = b"t"
_USER = b"u"
_ALL = b"a"
#: Which envelope kinds may arrive on which kind of channel.
_ALLOWED = {_TOPIC: (PUBLISH,), _USER: (SEND, DISCONNECT), _ALL: (BROADCAST, RELAY, LEAVE)}

# What a reply on the publishing connection answers.
_PUBLISH, _HANDSHAKE, _NUMSUB = 0, 1, 2


class LinkState(enum.Enum):
    #: ``start()`` not called yet.
    IDLE = "idle"
    #: Opening both connections, authenticating, subscribing every wanted channel.
    CONNECTING = "connecting"
    #: Messages flow both ways.
    UP = "up"
    #: Waiting out the backoff delay before the next attempt.
    DOWN = "down"
    #: Stopped for good (server shutdown).
    CLOSED = "closed"


class _Status(enum.Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"


@dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """A message from another node for this node's connections: ``kind`` is an envelope kind,
    ``key`` the topic (publish) or user id (send, disconnect), ``payload`` the text to deliver."""

    kind: bytes
    key: str
    payload: bytes


LinkOutput = BrokerConnect | BrokerClose | BrokerUp | BrokerDown | BrokerGap | Inbound


class _Outgoing:
    """One command on the publishing connection, kept until Redis answers it; a PUBLISH not
    answered before a reconnect is sent again."""

    __slots__ = ("command", "kind", "sent_at", "token")

    def __init__(self, command: bytes, token: int | None, kind: int = _PUBLISH) -> None:
        self.command = command
        self.token = token
        self.kind = kind
        self.sent_at = 0.0


class _Conn:
    __slots__ = ("out", "parser", "role", "status")

    def __init__(self, role: BrokerRole) -> None:
        self.role = role
        self.status = _Status.CLOSED
        self.parser: RespParser | None = None
        self.out: list[bytes] = []


class BrokerLink:
    """This node's link to the Redis it shares with the other nodes."""

    def __init__(self, config: BrokerConfig, *, rng: random.Random | None = None) -> None:
        RespParser()  # fail now, with the extra to install, if hiredis is missing
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self.channels = Channels(config.prefix)
        #: This node's id in envelopes; a new epoch suffix when the sequence table is reset.
        self.node_id = f"{self._rng.getrandbits(64):016x}"
        self._epoch = 0
        self._origin = self.node_id.encode()
        #: Every origin of this node starts so, whatever its epoch (see _new_epoch).
        self._own_prefix = self.node_id.encode()
        self.state = LinkState.IDLE
        self.generation = 0
        self._now = -float("inf")
        self._sub = _Conn(SUB)
        self._pub = _Conn(PUB)
        # Channel -> (channel kind, topic or user id). {prefix}:all is always wanted.
        self._want: dict[bytes, tuple[bytes, str]] = {self.channels.all: (_ALL, "")}
        self._pending_sub: dict[bytes, None] = {}
        self._pending_unsub: dict[bytes, None] = {}
        self._awaiting_confirm: set[bytes] = set()
        self._sub_handshake = 0
        # Publisher: replies expected in order (None: a handshake command), and the queue of
        # commands not yet written (the outage buffer, also the overflow of the pipeline window).
        self._pub_expect: deque[_Outgoing] = deque()
        self._in_flight_bytes = 0
        self._queue: deque[_Outgoing] = deque()
        self._queued_bytes = 0
        self._answers: list[tuple[int, str]] = []
        # Membership: nodes subscribed to {prefix}:all by Redis's latest count (None: not asked
        # yet since the link came up), and how many we expect (see the module docstring).
        self.members: int | None = None
        self.expected_members = 1
        self._short_since: float | None = None
        self._numsub_due = 0.0
        self._numsub_pending = False
        self._seq: dict[bytes, int] = {}
        # Receiving: channel -> origin -> last sequence number; the table from before the latest
        # reconnect still catches duplicates, but a skip across an outage is no gap.
        self._in_seq: dict[bytes, dict[bytes, int]] = {}
        self._in_seq_before: dict[bytes, dict[bytes, int]] = {}
        # Time.
        self._connect_deadline = 0.0
        self._retry_at = 0.0
        self._sub_last_seen = 0.0
        self._ping_deadline: float | None = None
        self._attempts = 0
        self._down_since: float | None = None
        self._reported_up: bool | None = None
        self._ever_up = False
        #: Why the link last went down ("" if it never did).
        self.last_error = ""
        # Counters behind /api/stats and /metrics.
        self.reconnects = 0
        self.gaps = 0
        self.missed = 0
        self.dropped = 0
        self.duplicates = 0
        self.published = 0
        self.received_messages = 0
        self.bad_envelopes = 0

    # ------------------------------------------------------------------ queries

    @property
    def up(self) -> bool:
        return self.state is LinkState.UP

    @property
    def buffered(self) -> int:
        """Messages for other nodes waiting to be written (the outage buffer)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """PUBLISH commands written and not yet answered (the membership and handshake queries
        that share the publishing connection are not publishes)."""
        return sum(1 for item in self._pub_expect if item.kind == _PUBLISH)

    def wanted_channels(self) -> frozenset[bytes]:
        """Every channel this node needs subscribed (for tests and tools)."""
        return frozenset(self._want)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work; None for never. Pure."""
        state = self.state
        if state is LinkState.UP:
            ping = self._ping_deadline
            due = self._sub_last_seen + self.config.probe_interval if ping is None else ping
            if self._pub_expect:
                stall = self._pub_expect[0].sent_at + self.config.probe_timeout
                if stall < due:
                    due = stall
            if not self._numsub_pending and self._numsub_due < due:
                due = self._numsub_due
            return due
        if state is LinkState.CONNECTING:
            return self._connect_deadline
        if state is LinkState.DOWN:
            return self._retry_at
        return None

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, now: float, wall_time: float) -> list[LinkOutput]:
        """Open the connections for the first time."""
        if self.state is not LinkState.IDLE:
            raise LocalProtocolError(f"start() called in state {self.state.value}; call it once")
        return self._connect(self._advance(now))

    def stop(self, *, now: float, wall_time: float) -> list[BrokerWrite | BrokerClose]:
        """Stop for good: what is queued for Redis is written, then both connections close."""
        self._advance(now)
        if self.state is LinkState.CLOSED:
            return []
        out: list[BrokerWrite | BrokerClose] = list(self.take_writes())
        for conn in (self._sub, self._pub):
            if conn.status is not _Status.CLOSED:
                out.append(BrokerClose(role=conn.role, generation=self.generation, graceful=True))
                conn.status = _Status.CLOSED
        for item in self._pub_expect:
            if item.token is not None:
                self._answers.append((item.token, DOWN))
        self._answer_queued_down()
        self._pub_expect.clear()
        self.state = LinkState.CLOSED
        return out

    def announce_leave(self, *, now: float) -> None:
        """Tell the other nodes this one is leaving for good (before ``stop`` at shutdown), so
        they do not wait ``rejoin_grace`` for it."""
        if self.state is LinkState.UP:
            self.publish(LEAVE, self.channels.all, b"", now=now)

    # ------------------------------------------------------------------ transport events

    def opened(
        self, role: BrokerRole, generation: int, *, now: float, wall_time: float
    ) -> list[LinkOutput]:
        """The adapter opened the connection asked for by ``BrokerConnect``."""
        conn = self._conn(role)
        if generation != self.generation or conn.status is not _Status.OPENING:
            return []  # a late answer to an attempt given up
        now = self._advance(now)
        conn.status = _Status.OPEN
        conn.parser = RespParser()
        auth = self._auth_command()
        if role is SUB:
            self._sub_last_seen = now
            self._ping_deadline = None
            if auth is not None:
                conn.out.append(auth)
                self._sub_handshake = 1
            # {prefix}:all last: once Redis counts us in its NUMSUB, every channel of ours is in.
            everyone = self.channels.all
            channels = [channel for channel in self._want if channel != everyone]
            channels.append(everyone)
            self._awaiting_confirm = set(channels)
            self._pending_sub.clear()
            self._pending_unsub.clear()
            self._write_batches(b"SUBSCRIBE", channels)
        else:
            if auth is not None:
                self._write_query(auth, _HANDSHAKE, now)
            if self.config.db:
                select = encode_command((b"SELECT", b"%d" % self.config.db))
                self._write_query(select, _HANDSHAKE, now)
        return self._check_up(now, wall_time)

    def received(
        self, role: BrokerRole, generation: int, data: bytes, *, now: float, wall_time: float
    ) -> list[LinkOutput]:
        """Bytes from a Redis connection."""
        conn = self._conn(role)
        parser = conn.parser
        if generation != self.generation or conn.status is not _Status.OPEN or parser is None:
            return []
        now = self._advance(now)
        error: str | None = None
        try:
            replies = parser.feed(data)
        except RespProtocolError as exc:
            replies = exc.replies
            error = f"protocol error from Redis ({role.value}): {exc}"
        out: list[LinkOutput] = []
        if role is SUB:
            self._sub_last_seen = now
            for reply in replies:
                problem = self._on_sub_reply(reply, wall_time, out)
                if problem is not None:
                    error = problem
                    break
        else:
            for reply in replies:
                problem = self._on_pub_reply(reply, now)
                if problem is not None:
                    error = problem
                    break
            if self.state is LinkState.UP:
                self._pump_queue(now)
        if error is not None:
            return out + self._fail(error, now, wall_time)
        if self.state is LinkState.CONNECTING:
            out += self._check_up(now, wall_time)
        return out

    def closed(
        self,
        role: BrokerRole,
        generation: int,
        *,
        now: float,
        wall_time: float,
        error: str | None = None,
    ) -> list[LinkOutput]:
        """A Redis connection is gone, or could not be opened."""
        conn = self._conn(role)
        if generation != self.generation or conn.status is _Status.CLOSED:
            return []
        now = self._advance(now)
        was_open = conn.status is _Status.OPEN
        conn.status = _Status.CLOSED
        if error is None:
            error = "Redis closed the connection" if was_open else "cannot connect"
        verb = "lost" if was_open else "cannot open"
        return self._fail(f"{verb} the {role.value} connection: {error}", now, wall_time)

    def tick(self, now: float, *, wall_time: float) -> list[LinkOutput]:
        """Service what is due: the connect timeout, the next attempt, the liveness probe."""
        now = self._advance(now)
        out: list[LinkOutput] = []
        state = self.state
        if state is LinkState.CONNECTING:
            if now >= self._connect_deadline:
                out = self._fail(
                    f"no connection within {self.config.connect_timeout} s", now, wall_time
                )
        elif state is LinkState.DOWN:
            if now >= self._retry_at:
                out = self._connect(now)
        elif state is LinkState.UP:
            timeout = self.config.probe_timeout
            oldest = self._pub_expect[0] if self._pub_expect else None
            if self._ping_deadline is not None and now >= self._ping_deadline:
                out = self._fail(f"no answer to PING within {timeout} s", now, wall_time)
            elif oldest is not None and now >= oldest.sent_at + timeout:
                out = self._fail(f"no answer from Redis within {timeout} s", now, wall_time)
            else:
                if self._ping_deadline is None and now >= (
                    self._sub_last_seen + self.config.probe_interval
                ):
                    # Idle: ask (never a read timeout; a quiet channel is not a dead one).
                    self._sub.out.append(b"*1\r\n$4\r\nPING\r\n")
                    self._ping_deadline = now + timeout
                if not self._numsub_pending and now >= self._numsub_due:
                    self._ask_members(now)
        if self.state is LinkState.DOWN and self._retry_at <= now:
            out += self._connect(now)  # a zero delay drawn: the next attempt is due already
        return out

    # ------------------------------------------------------------------ interest (from the engine)

    def topic_added(self, topic: str) -> None:
        """``topic`` got its first local subscriber."""
        self._want_add(self.channels.topic(topic), (_TOPIC, topic))

    def topic_removed(self, topic: str) -> None:
        """``topic`` lost its last local subscriber."""
        self._want_remove(self.channels.topic(topic))

    def user_added(self, user_id: str) -> None:
        """The first local connection of ``user_id`` opened."""
        self._want_add(self.channels.user(user_id), (_USER, user_id))

    def user_removed(self, user_id: str) -> None:
        """The last local connection of ``user_id`` closed."""
        self._want_remove(self.channels.user(user_id))

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
        item = _Outgoing(encode_publish(channel, envelope), token if up else None)
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
        if self._sub.status is _Status.OPEN and (self._pending_sub or self._pending_unsub):
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

    # ------------------------------------------------------------------ internals: connections

    def _advance(self, now: float) -> float:
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _conn(self, role: BrokerRole) -> _Conn:
        if role is SUB:
            return self._sub
        if role is PUB:
            return self._pub
        raise LocalProtocolError(f"not a broker role: {role!r}")

    def _auth_command(self) -> bytes | None:
        config = self.config
        if config.password is None:
            return None
        args = [b"AUTH"]
        if config.username is not None:
            args.append(config.username.encode())
        args.append(config.password.encode())
        return encode_command(args)

    def _connect(self, now: float) -> list[LinkOutput]:
        self.state = LinkState.CONNECTING
        self.generation += 1
        self._connect_deadline = now + self.config.connect_timeout
        out: list[LinkOutput] = []
        for conn in (self._sub, self._pub):
            conn.status = _Status.OPENING
            conn.parser = None
            conn.out = []
            out.append(
                BrokerConnect(
                    role=conn.role,
                    generation=self.generation,
                    host=self.config.host,
                    port=self.config.port,
                )
            )
        return out

    def _check_up(self, now: float, wall_time: float) -> list[LinkOutput]:
        if (
            self.state is not LinkState.CONNECTING
            or self._sub.status is not _Status.OPEN
            or self._pub.status is not _Status.OPEN
            or self._sub_handshake
            or self._awaiting_confirm
            or self._pub_expect
        ):
            return []
        self.state = LinkState.UP
        self._attempts = 0
        downtime = None if self._down_since is None else now - self._down_since
        if self._ever_up:
            self.reconnects += 1
        self._ever_up = True
        self._reported_up = True
        self._down_since = None
        self.members = None
        self._numsub_pending = False
        self._ask_members(now)  # first in the pipeline: every PUBLISH reply is judged by a count
        self._pump_queue(now)  # the outage buffer, in order, after everything is subscribed
        return [BrokerUp(reconnects=self.reconnects, downtime=downtime, wall_time=wall_time)]

    def _fail(self, reason: str, now: float, wall_time: float) -> list[LinkOutput]:
        """Drop both connections, keep what was not acknowledged, and schedule the next attempt."""
        out: list[LinkOutput] = []
        for conn in (self._sub, self._pub):
            if conn.status is not _Status.CLOSED:
                out.append(BrokerClose(role=conn.role, generation=self.generation, graceful=False))
                conn.status = _Status.CLOSED
            conn.parser = None
            conn.out = []
        self._sub_handshake = 0
        self._awaiting_confirm = set()
        self._pending_sub.clear()
        self._pending_unsub.clear()
        self._ping_deadline = None
        # Written but unanswered: maybe delivered, maybe not. Back to the front of the queue, in
        # order; receivers drop the copies they already have by sequence number.
        unanswered = [item for item in self._pub_expect if item.kind == _PUBLISH]
        self._pub_expect.clear()
        self._numsub_pending = False
        self.members = None
        self._in_flight_bytes = 0
        for item in reversed(unanswered):
            self._queue.appendleft(item)
            self._queued_bytes += len(item.command)
        self._answer_queued_down()
        self._trim_queue()
        if self._in_seq:
            self._in_seq_before = self._in_seq
            self._in_seq = {}
        if self._reported_up is not False:
            out.append(BrokerDown(reason=reason, wall_time=wall_time))
            self._reported_up = False
        if self._down_since is None:
            self._down_since = now
        self.last_error = reason
        self._attempts += 1
        config = self.config
        bound = min(
            config.reconnect_max_delay,
            config.reconnect_initial_delay * 2 ** min(self._attempts - 1, 60),
        )
        self._retry_at = now + self._rng.uniform(0.0, bound)
        self.state = LinkState.DOWN
        return out

    # ------------------------------------------------------------------ internals: subscriptions

    def _want_add(self, channel: bytes, target: tuple[bytes, str]) -> None:
        if channel in self._want:
            return
        self._want[channel] = target
        if self._sub.status is _Status.OPEN:
            if channel in self._pending_unsub:
                del self._pending_unsub[channel]  # never left: Redis still has it
            else:
                self._pending_sub[channel] = None

    def _want_remove(self, channel: bytes) -> None:
        if self._want.pop(channel, None) is None:
            return
        if self._sub.status is _Status.OPEN:
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
        if kind not in _ALLOWED[channel_kind]:
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

    # ------------------------------------------------------------------ internals: publishing

    def _on_pub_reply(self, reply: Reply, now: float) -> str | None:
        if not self._pub_expect:
            return f"unexpected reply from Redis: {reply!r}"[:200]
        item = self._pub_expect.popleft()
        if item.kind == _HANDSHAKE:  # AUTH or SELECT
            if isinstance(reply, RespError):
                return f"Redis refused: {reply}"
            return None
        if item.kind == _NUMSUB:
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
        self._write_query(command, _NUMSUB, now)
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
        item = _Outgoing(command, None, kind)
        item.sent_at = now
        self._pub.out.append(command)
        self._pub_expect.append(item)

    def _has_room(self, size: int) -> bool:
        expect = self._pub_expect
        return len(expect) < self.config.max_in_flight and (
            not expect or self._in_flight_bytes + size <= MAX_IN_FLIGHT_BYTES
        )

    def _write_publish(self, item: _Outgoing, now: float) -> None:
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
