"""The message-level engine: connections, topics, heartbeat, outbox accounting, one deadline heap.

It speaks in whole messages ("7 sent ``sub:news``", "ping 7", "close 7 with 1011") and never imports
wsproto, so any transport that carries WebSocket messages (sockets, ASGI, HTTP/2) can drive it. Time
enters as ``now`` and leaves as the pure ``next_deadline()``; every call returns its actions.

Its parts, one idea each: ``engine_state.py`` (registry and shared moves), ``delivery.py``
(publish, broadcast, send, outbox accounting), ``liveness.py`` (pings, heartbeat timeout, ``tick``);
this module holds a connection's life: opening, its messages, closing, shutdown.
"""
from __future__ import annotations

from ..actions import (
    AuthorizeSubscription,
    CloseTransport,
    EngineAction,
)
from ..errors import LocalProtocolError
from ..notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    MessageReceived,
    TopicSubscribed,
    TopicUnsubscribed,
)
from ..wire import close_codes
from ..wire.codec import (
    SHUTDOWN_TEXT,
    ClientHeartbeat,
    Relay,
    Subscribe,
    Unsubscribe,
    classify,
    hello,
)
from ..wire.recovery import BadRecover, Recover, classify_opted_in
from .engine_state import ConnectionRecord, ConnectionState, InterestListener, encode_text
from .replay import EngineReplay

__all__ = ["ConnectionState", "Engine", "InterestListener", "encode_text"]


class Engine(EngineReplay):
    """Every open connection of one server process, and what happens between them.

    Connection ids are chosen by the caller (the byte-level server or another transport); user ids
    are data. Application commands on unknown or closing connections raise ``LocalProtocolError``;
    network events for them (a race with a close) are ignored.
    """

    # ------------------------------------------------------------------ connection lifecycle

    def generate_user_id(self) -> str:
        """A fresh id for a client that brought none: a random node prefix plus a counter."""
        self._generated_ids += 1
        return f"client_{self._node_prefix}{self._generated_ids}"

    def open(
        self,
        conn_id: int,
        *,
        user_id: str,
        peer_host: str,
        now: float,
        wall_time: float,
        watched: bool = True,
        pinged: bool = True,
        recovery: bool = False,
    ) -> list[EngineAction]:
        """A WebSocket connection was established: queue the Hello frame and start its heartbeat
        (``watched=False``: never closed for silence; ``pinged=False``: no Pings, only the text
        heartbeat; ``recovery``: it agreed the recovery extension; see ``ConnectionRecord``)."""
        now = self._advance(now)
        if self._shutting_down:
            raise LocalProtocolError("the server is shutting down: refuse new connections instead")
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection id {conn_id} is already in use")
        if not isinstance(user_id, str):
            raise LocalProtocolError(f"user_id must be a str, got {type(user_id).__name__}")
        conn = ConnectionRecord(conn_id, user_id, peer_host, now, self.config.heartbeat_interval)
        conn.watched = watched
        conn.pinged = pinged
        if recovery:
            conn.recovery = True
            self._recovering += 1
        self._conns[conn_id] = conn
        self._open[conn_id] = conn
        same_user = self._by_user.get(user_id)
        if same_user is None:
            same_user = self._by_user[user_id] = {}
            if self._interest is not None:
                self._interest.user_added(user_id)
        same_user[conn_id] = conn
        self.connections_total += 1
        self._deadlines.set(conn_id, self._open_deadline(conn))
        actions: list[EngineAction] = []
        # PROTOCOL.md [ref]: the Hello frame is the first frame on every connection.
        self._send_one(conn, hello(user_id), actions, wall_time, force=True)
        actions.append(
            ClientConnected(
                conn_id=conn_id, user_id=user_id, peer_host=peer_host, wall_time=wall_time
            )
        )
        return actions

    def message_received(
        self, conn_id: int, payload: bytes, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """A complete data message (valid UTF-8) arrived from ``conn_id``."""
        conn = self._open.get(conn_id)
        if conn is None:
            return []  # closing or gone: PROTOCOL.md allows ignoring data after our Close
        conn.last_seen = self._advance(now)
        self.messages_in += 1
        match classify_opted_in(payload) if conn.recovery else classify(payload):
            case ClientHeartbeat():
                return []
            case Recover() as recover:
                return self._recover(conn, recover, len(payload), now, wall_time)
            case BadRecover(reason=reason):
                return self.protocol_failed(
                    conn_id, close_codes.POLICY_VIOLATION, reason, now=now, wall_time=wall_time
                )
            case Subscribe(topic=topic):
                refused = self._topic_refused(conn, topic, len(payload) - 4)
                if refused is not None:
                    self.limit_hits[refused] = self.limit_hits.get(refused, 0) + 1
                    reason = "topic name too long" if refused == "max_topic_length" else (
                        "too many topics"
                    )
                    return self.protocol_failed(
                        conn_id, close_codes.POLICY_VIOLATION, reason, now=now, wall_time=wall_time
                    )
                if self.config.authorize_subscriptions:
                    return self._ask_subscription(conn, topic)
                if self._subscribe(conn, topic):
                    return [
                        TopicSubscribed(
                            conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time
                        )
                    ]
                return []  # PROTOCOL.md [must]: repeated sub: is idempotent
            case Unsubscribe(topic=topic):
                if conn.pending_topics is not None:
                    conn.pending_topics.discard(topic)  # the later verdict is then ignored
                if conn.pending_recovery is not None:
                    conn.pending_recovery.pop(topic, None)
                if self._topics.unsubscribe(conn_id, topic):
                    if self._interest is not None and not self._topics.subscribers(topic):
                        self._interest.topic_removed(topic)
                    return [
                        TopicUnsubscribed(
                            conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time
                        )
                    ]
                return []  # PROTOCOL.md [must]: unknown unsubscribes are no-ops
            case Relay():
                actions: list[EngineAction] = [
                    MessageReceived(
                        conn_id=conn_id, user_id=conn.user_id, data=payload, wall_time=wall_time
                    )
                ]
                if self.config.relay:
                    # PROTOCOL.md case 4 [ref]: to every other connected client, never the sender.
                    others = (c for c in self._open.values() if c is not conn)
                    self._fan_out(payload, others, actions, wall_time)
                return actions

    def _recover(
        self, conn: ConnectionRecord, recover: Recover, size: int, now: float, wall_time: float
    ) -> list[EngineAction]:
        topic = recover.topic
        refused = self._topic_refused(conn, topic, len(topic.encode("utf-8", "surrogatepass")))
        if refused is not None or size > self.config.max_message_size:
            reason = "topic name too long" if refused == "max_topic_length" else "too many topics"
            if refused is not None:
                self.limit_hits[refused] = self.limit_hits.get(refused, 0) + 1
            return self._refuse_recovery(conn, reason, now, wall_time)
        if self.config.authorize_subscriptions and conn.conn_id not in self._topics.subscribers(
            topic
        ):
            # Replayed once the application allows the subscription (subscription_verdict).
            pending = conn.pending_recovery
            if pending is None:
                pending = conn.pending_recovery = {}
            pending[topic] = (recover.epoch, recover.offset)
            return self._ask_subscription(conn, topic)
        actions: list[EngineAction] = []
        if self._subscribe(conn, topic):
            actions.append(TopicSubscribed(conn_id=conn.conn_id, user_id=conn.user_id, topic=topic,
                                           wall_time=wall_time))
        self._replay(conn, topic, recover.epoch, recover.offset, actions, wall_time)
        return actions

    def _refuse_recovery(
        self, conn: ConnectionRecord, reason: str, now: float, wall_time: float
    ) -> list[EngineAction]:
        return self.protocol_failed(
            conn.conn_id, close_codes.POLICY_VIOLATION, reason, now=now, wall_time=wall_time
        )

    def relay_run(self, conn_id: int, count: int, size: int, *, now: float) -> list[int] | None:
        """``count`` relay messages in a row from ``conn_id`` that nobody is told about, framed
        into ``size`` bytes in all by the caller: their recipients, with the bytes counted in each
        outbox, as ``message_received`` would for each message (minus ``MessageReceived``).

        None, with nothing counted, when some recipient has no room for all of them: the caller
        then hands the messages to ``message_received`` one at a time, which closes that recipient
        at the very message that overflows it."""
        conn = self._open.get(conn_id)
        if conn is None:
            return []  # closing or gone: PROTOCOL.md allows ignoring data after our Close
        targets: list[ConnectionRecord] = []
        if self.config.relay:
            # PROTOCOL.md case 4 [ref]: to every other connected client, never the sender.
            room = self.config.max_outbox_bytes - size
            for other in self._open.values():
                if other is not conn:
                    if other.outbox > room:
                        return None
                    targets.append(other)
            for other in targets:
                other.outbox += size
            self.messages_out += count * len(targets)
        conn.last_seen = self._advance(now)
        self.messages_in += count
        return [other.conn_id for other in targets]

    def _topic_refused(
        self, conn: ConnectionRecord, topic: str, topic_bytes: int
    ) -> str | None:
        """The limit a ``sub:`` of a topic this long would break, if any (ours: close 1008)."""
        limits = self.config.limits
        if topic_bytes > limits.max_topic_length:
            return "max_topic_length"
        most = limits.max_topics_per_connection
        if most is not None:
            held = self._topics.count_of(conn.conn_id)
            if conn.pending_topics:
                held += len(conn.pending_topics)
            if held >= most and conn.conn_id not in self._topics.subscribers(topic):
                return "max_topics_per_connection"  # a repeated sub: stays idempotent
        return None

    def _ask_subscription(self, conn: ConnectionRecord, topic: str) -> list[EngineAction]:
        if conn.conn_id in self._topics.subscribers(topic):
            return []  # already subscribed: repeats stay idempotent, no second question
        pending = conn.pending_topics
        if pending is None:
            pending = conn.pending_topics = set()
        elif topic in pending:
            return []
        pending.add(topic)
        return [AuthorizeSubscription(conn_id=conn.conn_id, user_id=conn.user_id, topic=topic)]

    def subscription_verdict(
        self, conn_id: int, topic: str, allowed: bool, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The application's answer to ``AuthorizeSubscription``. A verdict for a connection that
        has gone, or for a topic it has unsubscribed from meanwhile, is ignored."""
        self._advance(now)
        conn = self._open.get(conn_id)
        if conn is None or conn.pending_topics is None or topic not in conn.pending_topics:
            return []
        conn.pending_topics.discard(topic)
        if not conn.pending_topics:
            conn.pending_topics = None
        resume = None if conn.pending_recovery is None else conn.pending_recovery.pop(topic, None)
        if not allowed:
            return []  # PROTOCOL.md: the reference never answers subscriptions on the wire
        self._subscribe(conn, topic)
        actions: list[EngineAction] = [
            TopicSubscribed(conn_id=conn_id, user_id=conn.user_id, topic=topic, wall_time=wall_time)
        ]
        if resume is not None:
            self._replay(conn, topic, *resume, actions, wall_time)
        return actions

    def close_received(
        self, conn_id: int, code: int | None, reason: str, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The peer's Close arrived (``code`` None for an empty body, i.e. 1005)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        now = self._advance(now)
        actions: list[EngineAction] = []
        if conn.state is ConnectionState.OPEN:
            # PROTOCOL.md [ref]: answer with a Close carrying the same code, then close TCP
            # (RFC 6455 §7.1.1: the server closes the TCP connection first).
            self._start_close(conn, code, "", False, now, actions)
            ended_code = close_codes.NO_STATUS if code is None else code
            ended_reason = reason
        else:
            ended_code, ended_reason = conn.close_code, conn.close_reason
        actions.append(CloseTransport(conn_id=conn_id))
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id,
                user_id=conn.user_id,
                code=ended_code,
                reason=ended_reason,
                wall_time=wall_time,
            )
        )
        return actions

    def protocol_failed(
        self, conn_id: int, code: int, reason: str, *, now: float, wall_time: float
    ) -> list[EngineAction]:
        """The peer broke the protocol (1002, 1007, 1009): Fail the WebSocket Connection.

        RFC 6455 §7.1.7: send a Close with the code, then close the TCP connection.
        """
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        now = self._advance(now)
        actions: list[EngineAction] = [
            ErrorOccurred(
                code=ErrorCode.READ_ERROR,
                message=f"protocol error ({code}): {reason}",
                conn_id=conn_id,
                user_id=conn.user_id,
                wall_time=wall_time,
            )
        ]
        if conn.state is ConnectionState.OPEN:
            self._start_close(conn, code, reason, True, now, actions)
        actions.append(CloseTransport(conn_id=conn_id))
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id,
                user_id=conn.user_id,
                code=conn.close_code,
                reason=conn.close_reason,
                wall_time=wall_time,
            )
        )
        return actions

    def transport_closed(
        self,
        conn_id: int,
        *,
        now: float,
        wall_time: float,
        error: str | None = None,
        write_failed: bool = False,
    ) -> list[EngineAction]:
        """The transport is gone (EOF, reset, write failure)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []  # our own close completing, or a race
        self._advance(now)
        actions: list[EngineAction] = []
        if conn.state is ConnectionState.OPEN:
            code, reason = close_codes.ABNORMAL, error or "connection lost"
            if error is not None:
                actions.append(
                    ErrorOccurred(
                        code=ErrorCode.WRITE_ERROR if write_failed else ErrorCode.READ_ERROR,
                        message=error,
                        conn_id=conn_id,
                        user_id=conn.user_id,
                        wall_time=wall_time,
                    )
                )
        else:
            code, reason = conn.close_code, conn.close_reason
        self._forget(conn)
        actions.append(
            ClientDisconnected(
                conn_id=conn_id, user_id=conn.user_id, code=code, reason=reason, wall_time=wall_time
            )
        )
        return actions

    def close(
        self,
        conn_id: int,
        code: int = close_codes.NORMAL,
        reason: str = "",
        *,
        now: float,
        wall_time: float,
    ) -> list[EngineAction]:
        """Close one open connection; queued data is sent first (PROTOCOL.md: operator close 1000)."""
        close_codes.validate_close_code(code)
        if len(encode_text(reason, "reason")) > 123:
            raise LocalProtocolError("a close reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5)")
        conn = self._require_open(conn_id)
        now = self._advance(now)
        actions: list[EngineAction] = []
        self._start_close(conn, code, reason, False, now, actions)
        return actions

    def disconnect_user(
        self, user_id: str, *, now: float, wall_time: float
    ) -> tuple[int, list[EngineAction]]:
        """Close every open connection of ``user_id`` with 1000; returns how many."""
        now = self._advance(now)
        actions: list[EngineAction] = []
        conns = list(self._by_user.get(user_id, {}).values())
        for conn in conns:
            self._start_close(conn, close_codes.NORMAL, "", False, now, actions)
        return len(conns), actions

    def shutdown(self, *, now: float, wall_time: float) -> list[EngineAction]:
        """Graceful shutdown (PROTOCOL.md): ``Server is shutting down`` to every client, then
        Close 1001 behind any pending output; ``close_timeout`` later, stragglers are dropped."""
        now = self._advance(now)
        self._shutting_down = True
        actions: list[EngineAction] = []
        for conn in list(self._open.values()):
            self._send_one(conn, SHUTDOWN_TEXT, actions, wall_time, force=True)
            self._start_close(conn, close_codes.GOING_AWAY, "server shutdown", False, now, actions)
        return actions
