"""The engine's clock: pings, the heartbeat deadline, the stall grace, ``tick``.

Heartbeat (PROTOCOL.md, "Our decisions"): every ``heartbeat_interval`` a Ping (and the text
``heartbeat``) goes to each open connection; one from which nothing has arrived for
``heartbeat_timeout`` is closed with 1011 ``heartbeat timeout``. Receiving never touches the heap:
it only sets ``last_seen``; when an entry fires, ``tick`` recomputes the real deadline and re-pushes
it if it still lies ahead (lazy extension, one heap operation per interval however busy the
connection).
"""

from __future__ import annotations

from ..actions import (
    AbortTransport,
    EngineAction,
    SendPing,
)
from ..notifications import (
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
)
from ..wire import close_codes
from ..wire.codec import (
    TEXT_HEARTBEAT,
)
from .delivery import EngineDelivery
from .engine_state import ConnectionRecord, ConnectionState

__all__ = ["EngineLiveness"]


class EngineLiveness(EngineDelivery):
    """Time: who is due a Ping, who has been silent too long."""

    def due_time(self, conn_id: int) -> float:
        """When the connection really needs service, recomputed from its state (for oracles)."""
        conn = self._require(conn_id)
        registered = self._deadlines.get(conn_id)
        if conn.state is ConnectionState.CLOSING:
            assert registered is not None
            return registered
        return self._open_deadline(conn)

    def touch(self, conn_id: int, now: float) -> None:
        """Bytes arrived from ``conn_id``: a sign of life (any frame, even half of one)."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            now = self._advance(now)
            conn.last_seen = now

    def pong_received(self, conn_id: int, payload: bytes, *, now: float) -> None:
        """A Pong arrived; when it answers our latest Ping it gives a round-trip time sample."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        now = self._advance(now)
        conn.last_seen = now
        self.pongs_received += 1
        if conn.ping_payload is not None and payload == conn.ping_payload:
            conn.rtt = now - conn.ping_sent_at
            conn.ping_payload = None

    def tick(self, now: float, *, wall_time: float) -> list[EngineAction]:
        """Service everything due by ``now``: pings, heartbeat timeouts, close timeouts.

        Idempotent for the same ``now``; afterwards ``next_deadline()`` is None or later than now.
        """
        now = self._advance(now)
        actions: list[EngineAction] = []
        timeout = self.config.heartbeat_timeout
        # One Ping payload per tick and one shared text-heartbeat frame: framed once for all.
        ping_payload: bytes | None = None
        heartbeat_to: list[ConnectionRecord] = []
        ping_by = now + self.ping_window
        for conn_id, due in self._deadlines.pop_due(ping_by):
            conn = self._conns[conn_id]
            if due > now and conn.state is ConnectionState.CLOSING:
                self._deadlines.set(conn_id, due)  # popped with the ping window: not yet due
                continue
            if conn.state is ConnectionState.CLOSING:
                # The peer never answered our Close within close_timeout: drop TCP.
                actions.append(AbortTransport(conn_id=conn_id))
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
                continue
            if not conn.watched:
                conn.last_seen = now  # its transport's own pings judge it (engine_state.py)
            silent_for = now - conn.last_seen
            # The same sum as _open_deadline: `now - last_seen` may round below the timeout.
            # A grace counts only for the silence it was given for (the same last_seen).
            grace = conn.grace_until if conn.grace_seen == conn.last_seen else None
            if now < conn.last_seen + timeout:
                conn.grace_until = None
            elif grace is None and now - due > self._stall:
                # We woke far too late (a blocked loop, a long GC): the peer's bytes may sit
                # unread in the kernel. Give readers a short grace before blaming the peer.
                conn.grace_until = now + self._stall
                conn.grace_seen = conn.last_seen
            elif grace is None or now >= grace:
                self._heartbeat_timeout(conn, silent_for, now, actions, wall_time)
                continue
            if ping_by >= conn.next_ping:
                if conn.pinged:
                    if ping_payload is None:
                        self._ping_counter += 1
                        ping_payload = self._ping_counter.to_bytes(8, "big")
                    self._ping(conn, ping_payload, now, actions)
                else:
                    self._next_interval(conn, now)  # its transport pings it (engine_state.py)
                heartbeat_to.append(conn)
            self._deadlines.set(conn_id, self._open_deadline(conn))
        if heartbeat_to and self.config.text_heartbeat:
            # PROTOCOL.md [ref]: the text `heartbeat` every interval; a connection too far behind
            # to take it is a slow consumer like any other.
            self._fan_out(TEXT_HEARTBEAT, heartbeat_to, actions, wall_time)
        return actions

    def _open_deadline(self, conn: ConnectionRecord) -> float:
        death = conn.last_seen + self.config.heartbeat_timeout
        if conn.grace_until is not None and conn.grace_seen == conn.last_seen:
            death = max(death, conn.grace_until)
        return min(conn.next_ping, death)

    def _ping(
        self, conn: ConnectionRecord, payload: bytes, now: float, actions: list[EngineAction]
    ) -> None:
        conn.ping_payload = payload
        conn.ping_sent_at = now
        self.pings_sent += 1
        actions.append(SendPing(conn_id=conn.conn_id, payload=payload))
        self._next_interval(conn, now)

    def _next_interval(self, conn: ConnectionRecord, now: float) -> None:
        interval = self.config.heartbeat_interval
        conn.next_ping += interval
        if conn.next_ping <= now + self.ping_window:
            conn.next_ping = now + interval  # after a stall: one ping, not a burst

    def _heartbeat_timeout(
        self,
        conn: ConnectionRecord,
        silent_for: float,
        now: float,
        actions: list[EngineAction],
        wall_time: float,
    ) -> None:
        self.heartbeat_timeouts += 1
        actions.append(
            HeartbeatTimedOut(
                conn_id=conn.conn_id, user_id=conn.user_id, silent_for=silent_for,
                wall_time=wall_time,
            )
        )
        actions.append(
            ErrorOccurred(
                code=ErrorCode.HEARTBEAT_FAILED,
                message=f"heartbeat timeout: nothing received for {silent_for:.3f} s",
                conn_id=conn.conn_id,
                user_id=conn.user_id,
                wall_time=wall_time,
            )
        )
        self._start_close(conn, close_codes.INTERNAL_ERROR, "heartbeat timeout", True, now, actions)
