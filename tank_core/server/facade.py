"""``TankServer``: what the adapters drive. Sockets' bytes in; what to open, abort or pause out; bytes
taken from its output lanes when a socket can be written.

An adapter calls ``start()`` once, ``accept()`` for each new socket, feeds events through
``receive()``, calls ``tick()`` when ``next_deadline()`` comes, and carries out the returned actions
in order; then it asks ``take_ready()`` which sockets have something to write and takes their bytes
with ``data_to_send(conn_id)`` when each socket can be written (DESIGN.md §3). Application commands
(``publish``, ``broadcast``, ...) return their actions too. Nothing here does I/O or reads a clock.

The parts, one module each: ``state.py`` (shared state, output lanes), ``websocket.py`` (frames and
the RFC 6455 duties), ``http.py`` (requests, router, upgrade), ``cluster.py`` (the broker link).
"""

from __future__ import annotations

from ..actions import AbortTransport, Action
from ..cluster.envelope import BROADCAST, DISCONNECT, PUBLISH, SEND
from ..errors import LocalProtocolError
from ..events import (
    BytesReceived,
    CloseArrived,
    ConnectionOpened,
    Event,
    MessageArrived,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
)
from ..notifications import ErrorCode, ErrorOccurred
from ..wire.connection import WireConnection, WireState
from . import http_api
from .cluster import ClusterGlue
from .engine import encode_text
from .pacing import PAUSE_AUTH

__all__ = ["TankServer"]

_HTTP_PHASE = (WireState.HTTP, WireState.AUTHORIZING)


class TankServer(ClusterGlue):
    """The sans-IO server: one per process (or per listening endpoint)."""

    # ------------------------------------------------------------------ queries

    def next_deadline(self) -> float | None:
        """The earliest time ``tick`` has work, on the adapter's clock; None for never. Pure."""
        a = self.engine.next_deadline()
        b = self._request_deadlines.earliest()
        if b is not None and (a is None or b < a):
            a = b
        if self.broker is not None:
            c = self.broker.next_deadline()
            if c is not None and (a is None or c < a):
                a = c
        d = self._rate_deadlines.earliest()
        if d is not None and (a is None or d < a):
            a = d
        return a

    @property
    def shutting_down(self) -> bool:
        return self.engine.shutting_down

    @property
    def finished(self) -> bool:
        """True once shutdown has begun and every WebSocket connection has ended."""
        return self.engine.shutting_down and self.engine.connection_count == 0

    def connection_ids(self) -> tuple[int, ...]:
        """Every accepted socket the server still tracks (HTTP and WebSocket)."""
        return tuple(self._wires)


    # ------------------------------------------------------------------ transport events

    def accept(self, *, peer_host: str, now: float, messages: bool = False) -> int:
        """A new socket was accepted; returns the id to use in its events.

        ``messages=True``: its transport does the WebSocket framing itself (ASGI). Its request
        still comes as bytes (``BytesReceived``), but once upgraded it delivers whole messages
        (``MessageArrived``, ``CloseArrived``) and takes ``messages_to_send`` instead of bytes.
        """
        self._check_poison()
        self._next_id += 1
        conn_id = self._next_id
        self._now = max(self._now, now)
        self._wires[conn_id] = WireConnection(
            conn_id, peer_host, self.config.max_message_size, message_level=messages
        )
        self._outputs.add(conn_id)
        self._request_deadlines.set(conn_id, now + self.config.request_timeout)
        most = self.config.limits.max_connections
        if most is not None and len(self._wires) > most:
            # Limits: max_connections. Answered before its request is read, then closed.
            self._hit("max_connections")
            self._queue(conn_id, http_api.OVERLOADED_ANSWER, control=True)
            self._linger(conn_id)
        return conn_id

    def receive(self, event: Event) -> list[Action]:
        """Feed one transport event; returns the actions to carry out, in order."""
        self._check_poison()
        wall_time = getattr(event, "wall_time", None)
        if isinstance(wall_time, float | int):
            self._wall_time = wall_time
        try:
            actions = self._receive(event)
            if self.broker is not None:
                actions += self._drain_broker(self._now, self._wall_time)
            return actions + self._take_answered()
        except LocalProtocolError:
            raise
        except Exception as exc:  # a bug of ours in shared state: stop serving (DESIGN.md §4)
            self._poisoned = exc
            raise

    def _receive(self, event: Event) -> list[Action]:
        now_seen = getattr(event, "now", None)
        if isinstance(now_seen, float | int) and now_seen > self._now:
            self._now = now_seen
        match event:
            case BytesReceived(conn_id=conn_id, data=data, now=now, wall_time=wall_time):
                wire = self._wires.get(conn_id)
                if not data:
                    return []  # nothing arrived (EOF is TransportClosed, never empty bytes)
                if self.tracer is not None and wire is not None:
                    self.tracer.received(conn_id, data)
                if wire is None:
                    broker = self._broker_conns.get(conn_id)
                    if broker is None or self.broker is None:
                        return []  # a race with our close
                    return self._broker_outputs(
                        self.broker.received(*broker, data, now=now, wall_time=wall_time),
                        now,
                        wall_time,
                    )
                if wire.state is WireState.CLOSED:
                    return []  # a race with our close
                if wire.state is WireState.WEBSOCKET:
                    return self._paced_websocket_bytes(wire, data, now, wall_time)
                wire.http_conn().receive_data(data)
                if wire.state is WireState.AUTHORIZING:
                    return []  # kept until the verdict; reading is paused
                actions = self._drive_http(wire, now, wall_time)
                if wire.state in _HTTP_PHASE:  # (an upgrade paced what followed it itself)
                    self._input_handled(wire, len(data), now, actions)
                return actions
            case TransportClosed(
                conn_id=conn_id, now=now, wall_time=wall_time, error=error, write_failed=wf
            ):
                wire = self._wires.get(conn_id)
                held: list[Action] = []
                if wire is not None and wire.backlog and wire.state is WireState.WEBSOCKET:
                    # Bytes already handed to the core are handled, turn budget or not.
                    held = self._finish_backlog(wire, now, wall_time)
                self._forget_wire(conn_id)
                if wire is None:
                    broker = self._broker_conns.pop(conn_id, None)
                    if broker is None or self.broker is None:
                        return []
                    del self._broker_ids[broker]
                    return self._broker_outputs(
                        self.broker.closed(*broker, now=now, wall_time=wall_time, error=error),
                        now,
                        wall_time,
                    )
                if wire.state is WireState.WEBSOCKET:
                    return held + self._translate(
                        self.engine.transport_closed(
                            conn_id, now=now, wall_time=wall_time, error=error, write_failed=wf
                        )
                    )
                return []
            case ConnectionOpened(conn_id=conn_id, now=now, wall_time=wall_time):
                broker = self._broker_conns.get(conn_id)
                if broker is None or self.broker is None:
                    if conn_id in self._wires:
                        raise LocalProtocolError(
                            f"connection {conn_id} was accepted, not opened on request"
                        )
                    return []  # given up meanwhile (AbortTransport was asked for)
                output = self._outputs.by_id.get(conn_id)
                if output is not None and (output.data or output.control or output.closing):
                    # Named while it was opening, when the adapter could not write it.
                    self._outputs.mark(output)
                return self._broker_outputs(
                    self.broker.opened(*broker, now=now, wall_time=wall_time), now, wall_time
                )
            case UpgradeAuthorized(conn_id=conn_id, now=now, wall_time=wall_time):
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is WireState.CLOSED:
                    return []  # closed meanwhile (request_timeout, EOF)
                if wire.state is not WireState.AUTHORIZING:
                    raise LocalProtocolError(f"connection {conn_id} is not waiting for a verdict")
                resumed: list[Action] = []
                self._resume(wire, PAUSE_AUTH, resumed)
                return resumed + self._upgrade(wire, now, wall_time)
            case UpgradeRefused(
                conn_id=conn_id, now=now, wall_time=wall_time, status=status, reason=reason
            ):
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is WireState.CLOSED:
                    return []  # closed meanwhile (request_timeout, EOF)
                if wire.state is not WireState.AUTHORIZING:
                    raise LocalProtocolError(f"connection {conn_id} is not waiting for a verdict")
                if not 400 <= status <= 599:
                    raise LocalProtocolError(f"a refusal needs a 4xx or 5xx status, got {status}")
                # PROTOCOL.md [ref]: HTTP 401 with a short plain-text body, never upgraded.
                wire.state = WireState.HTTP
                actions = [
                    ErrorOccurred(
                        code=ErrorCode.AUTHENTICATION_FAILED,
                        message=f"authentication failed: {reason}",
                        conn_id=None,
                        user_id=wire.user_id,
                        wall_time=wall_time,
                    )
                ]
                self._refuse(wire, http_api.text_response(status, reason))
                return actions
            case MessageArrived(
                conn_id=conn_id, data=data, binary=binary, now=now, wall_time=wall_time
            ):
                wire = self._framed_elsewhere(conn_id, "MessageArrived")
                if wire is None:
                    return []  # a race with our close
                return self._message_arrived(wire, data, binary, now, wall_time)
            case CloseArrived(conn_id=conn_id, code=code, reason=reason, now=now, wall_time=wall):
                wire = self._framed_elsewhere(conn_id, "CloseArrived")
                if wire is None:
                    return []
                actions = self._translate(
                    self.engine.close_received(conn_id, code, reason, now=now, wall_time=wall)
                )
                self._forget_wire(conn_id)  # its transport finished the closing handshake
                return actions
            case _:
                raise LocalProtocolError(f"not a Tank event: {event!r}")

    def _framed_elsewhere(self, conn_id: int, what: str) -> WireConnection | None:
        """The upgraded, message-level connection ``conn_id``; None once it is gone."""
        wire = self._wires.get(conn_id)
        if wire is None or wire.state is WireState.CLOSED:
            return None
        if not wire.message_level:
            raise LocalProtocolError(
                f"{what} is for connections accepted with messages=True; {conn_id} takes bytes"
            )
        if wire.state is not WireState.WEBSOCKET:
            raise LocalProtocolError(f"{what}: connection {conn_id} is not upgraded")
        return wire

    # ------------------------------------------------------------------ time

    def tick(self, now: float, *, wall_time: float) -> list[Action]:
        """Service everything due by ``now`` (pings, timeouts, stale HTTP requests)."""
        self._check_poison()
        if now > self._now:
            self._now = now
        self._wall_time = wall_time
        try:
            actions = self._translate(self.engine.tick(now, wall_time=wall_time))
            if self.broker is not None:
                actions += self._broker_outputs(
                    self.broker.tick(now, wall_time=wall_time), now, wall_time
                )
            for conn_id, _due in self._request_deadlines.pop_due(now):
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is WireState.WEBSOCKET:
                    continue
                if wire.state is WireState.CLOSED:
                    # Asked to close close_timeout ago and still not reported gone: the peer
                    # is not taking our last bytes. Drop it.
                    self._forget_wire(conn_id)
                    actions.append(AbortTransport(conn_id=conn_id))
                else:
                    # Slow or idle HTTP client (request_timeout): close it.
                    self._linger(wire.conn_id)
            self._rates_due(now, actions)
            if self.broker is not None:
                actions += self._drain_broker(now, wall_time)
            return actions + self._take_answered()
        except Exception as exc:
            self._poisoned = exc
            raise

    # ------------------------------------------------------------------ application commands

    def publish(self, topic: str, data: str, *, now: float, wall_time: float
                ) -> tuple[int, list[Action]]:
        """Publish to a topic's subscribers on this node, and on every other node of a cluster;
        returns (delivered here, actions)."""
        self._check_poison()
        link = self.broker
        if link is None:
            delivered, actions = self.engine.publish(topic, data, now=now, wall_time=wall_time)
            return delivered, self._translate(actions)
        payload = self.engine.render_publish(topic, data)
        delivered, actions = self.engine.publish_rendered(
            topic, payload, now=now, wall_time=wall_time
        )
        link.publish(PUBLISH, link.channels.topic(topic), payload, now=now)
        return delivered, self._translate(actions) + self._drain_broker(now, wall_time)

    def broadcast(self, text: str, *, exclude: int | None = None, now: float, wall_time: float
                  ) -> tuple[int, list[Action]]:
        """Send ``text`` to every open connection but ``exclude`` (on every node of a cluster);
        returns (delivered here, actions)."""
        self._check_poison()
        link = self.broker
        if link is None:
            delivered, actions = self.engine.broadcast(
                text, exclude=exclude, now=now, wall_time=wall_time
            )
            return delivered, self._translate(actions)
        payload = encode_text(text, "broadcast text")
        delivered, actions = self.engine.broadcast_rendered(
            payload, exclude=exclude, now=now, wall_time=wall_time
        )
        link.publish(BROADCAST, link.channels.all, payload, exclude=exclude, now=now)
        return delivered, self._translate(actions) + self._drain_broker(now, wall_time)

    def send(self, conn_id: int, text: str, *, now: float, wall_time: float) -> list[Action]:
        """Send ``text`` to one open connection."""
        self._check_poison()
        return self._translate(self.engine.send(conn_id, text, now=now, wall_time=wall_time))

    def send_to_user(self, user_id: str, text: str, *, now: float, wall_time: float
                     ) -> tuple[int, list[Action]]:
        """Send ``text`` to every open connection of ``user_id`` (on every node of a cluster);
        returns (delivered here, actions)."""
        self._check_poison()
        link = self.broker
        if link is None:
            delivered, actions = self.engine.send_to_user(
                user_id, text, now=now, wall_time=wall_time
            )
            return delivered, self._translate(actions)
        if not isinstance(user_id, str):
            raise LocalProtocolError(f"user_id must be a str, got {type(user_id).__name__}")
        payload = encode_text(text, "text")
        delivered, actions = self.engine.send_to_user_rendered(
            user_id, payload, now=now, wall_time=wall_time
        )
        link.publish(SEND, link.channels.user(user_id), payload, now=now)
        return delivered, self._translate(actions) + self._drain_broker(now, wall_time)

    def close(self, conn_id: int, code: int = 1000, reason: str = "", *, now: float,
              wall_time: float) -> list[Action]:
        """Close one connection (default 1000) after its queued output."""
        self._check_poison()
        actions = self._translate(
            self.engine.close(conn_id, code, reason, now=now, wall_time=wall_time)
        )
        if self.broker is not None:
            actions += self._drain_broker(now, wall_time)
        return actions

    def subscription_verdict(
        self, conn_id: int, topic: str, allowed: bool, *, now: float, wall_time: float
    ) -> list[Action]:
        """Answer an ``AuthorizeSubscription``: subscribe ``conn_id`` to ``topic`` if ``allowed``."""
        self._check_poison()
        actions = self._translate(
            self.engine.subscription_verdict(conn_id, topic, allowed, now=now, wall_time=wall_time)
        )
        if self.broker is not None:
            actions += self._drain_broker(now, wall_time)
        return actions

    def disconnect_user(self, user_id: str, *, now: float, wall_time: float
                        ) -> tuple[int, list[Action]]:
        """Close every connection of ``user_id`` with 1000 (on every node of a cluster); returns
        (closed here, actions)."""
        self._check_poison()
        closed, actions = self.engine.disconnect_user(user_id, now=now, wall_time=wall_time)
        link = self.broker
        if link is None:
            return closed, self._translate(actions)
        if not isinstance(user_id, str):
            raise LocalProtocolError(f"user_id must be a str, got {type(user_id).__name__}")
        link.publish(DISCONNECT, link.channels.user(user_id), b"", now=now)
        return closed, self._translate(actions) + self._drain_broker(now, wall_time)

    def shutdown(self, *, now: float, wall_time: float) -> list[Action]:
        """Begin graceful shutdown: refuse new upgrades, say goodbye, close 1001, drop HTTP; a
        cluster node leaves Redis after writing what it still had for the other nodes."""
        self._check_poison()
        actions = self._translate(self.engine.shutdown(now=now, wall_time=wall_time))
        for wire in list(self._wires.values()):
            if wire.state in (WireState.HTTP, WireState.AUTHORIZING):
                self._linger(wire.conn_id)
        if self.broker is not None:
            self.broker.announce_leave(now=now)
            actions += self._drain_broker(now, wall_time)
            actions += self._broker_outputs(
                self.broker.stop(now=now, wall_time=wall_time), now, wall_time
            )
            self._awaiting.clear()
        return actions

    # ------------------------------------------------------------------ the broker link
