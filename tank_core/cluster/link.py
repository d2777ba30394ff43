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

from ..errors import LocalProtocolError
from ..notifications import BrokerDown, BrokerUp
from .envelope import (
    LEAVE,
)
from .link_base import (
    DOWN,
    REPLY_HANDSHAKE,
    REPLY_PUBLISH,
    SUB,
    ConnStatus,
    Inbound,
    LinkOutput,
    LinkState,
)
from .publishing import LinkPublishing
from .resp import RespParser, RespProtocolError, encode_command
from .vocabulary import BrokerClose, BrokerConnect, BrokerRole, BrokerWrite

__all__ = ["BrokerLink", "Inbound", "LinkOutput", "LinkState"]


class BrokerLink(LinkPublishing):
    """This node's link to the Redis it shares with the other nodes."""

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
            if conn.status is not ConnStatus.CLOSED:
                out.append(BrokerClose(role=conn.role, generation=self.generation, graceful=True))
                conn.status = ConnStatus.CLOSED
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
        if generation != self.generation or conn.status is not ConnStatus.OPENING:
            return []  # a late answer to an attempt given up
        now = self._advance(now)
        conn.status = ConnStatus.OPEN
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
                self._write_query(auth, REPLY_HANDSHAKE, now)
            if self.config.db:
                select = encode_command((b"SELECT", b"%d" % self.config.db))
                self._write_query(select, REPLY_HANDSHAKE, now)
        return self._check_up(now, wall_time)

    def received(
        self, role: BrokerRole, generation: int, data: bytes, *, now: float, wall_time: float
    ) -> list[LinkOutput]:
        """Bytes from a Redis connection."""
        conn = self._conn(role)
        parser = conn.parser
        if generation != self.generation or conn.status is not ConnStatus.OPEN or parser is None:
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
        if generation != self.generation or conn.status is ConnStatus.CLOSED:
            return []
        now = self._advance(now)
        was_open = conn.status is ConnStatus.OPEN
        conn.status = ConnStatus.CLOSED
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

    def _connect(self, now: float) -> list[LinkOutput]:
        self.state = LinkState.CONNECTING
        self.generation += 1
        self._connect_deadline = now + self.config.connect_timeout
        out: list[LinkOutput] = []
        for conn in (self._sub, self._pub):
            conn.status = ConnStatus.OPENING
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
            or self._sub.status is not ConnStatus.OPEN
            or self._pub.status is not ConnStatus.OPEN
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
            if conn.status is not ConnStatus.CLOSED:
                out.append(BrokerClose(role=conn.role, generation=self.generation, graceful=False))
                conn.status = ConnStatus.CLOSED
            conn.parser = None
            conn.out = []
        self._sub_handshake = 0
        self._awaiting_confirm = set()
        self._pending_sub.clear()
        self._pending_unsub.clear()
        self._ping_deadline = None
        # Written but unanswered: maybe delivered, maybe not. Back to the front of the queue, in
        # order; receivers drop the copies they already have by sequence number.
        unanswered = [item for item in self._pub_expect if item.kind == REPLY_PUBLISH]
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
