"""A cluster node's glue: the broker link's connections, messages from other nodes, API answers.

With ``config.broker`` set, publishes, broadcasts, relays, sends to a user and disconnects go to
the local connections first, then to the other nodes through Redis (docs/scale-out.md). The link's
own vocabulary (``BrokerConnect``/``BrokerWrite``/``BrokerClose``) becomes connections like any
other (``OpenConnection``, the output lanes, ``AbortTransport``): one stream vocabulary for the
adapters. An HTTP publish, broadcast or disconnect is answered once Redis has acknowledged it
(``"broker": "up"``, or ``"partial"`` while nodes known before are missing), or at once when the
link is down (``"broker": "down"``: other nodes were not reached).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..actions import AbortTransport, Action, OpenConnection, ResumeReading
from ..cluster.envelope import BROADCAST, DISCONNECT, PUBLISH, RELAY, SEND
from ..cluster.link import Inbound, LinkOutput
from ..cluster.vocabulary import BrokerClose, BrokerConnect, BrokerWrite
from ..errors import LocalProtocolError
from ..wire.connection import WireConnection, WireState
from . import http_api
from .engine import encode_text
from .http import HttpPhase
from .pacing import PAUSE_ANSWER


class ClusterGlue(HttpPhase):
    """The broker link as the server drives it."""

    def _run_cluster_api_call(
        self, call: http_api.ApiCall, wire: WireConnection, now: float, wall_time: float
    ) -> list[Action]:
        """An API call on a cluster node: publish, broadcast and disconnect also go to the other
        nodes, and their answer waits for Redis's acknowledgement while the link is up."""
        engine = self.engine
        link = self.broker
        assert link is not None
        conn_id = wire.conn_id
        match call:
            case http_api.PublishCall(topic=topic, data=data):
                payload = engine.render_publish(topic, data)
                count, engine_actions = engine.publish_rendered(
                    topic, payload, now=now, wall_time=wall_time
                )
                what, kind, channel = "publish", PUBLISH, link.channels.topic(topic)
            case http_api.BroadcastCall(data=data):
                try:
                    payload = encode_text(data, "broadcast text")
                except LocalProtocolError:
                    response = http_api.error_response(400, "field 'data' is not valid Unicode")
                    self._respond(wire, response, now)
                    return []
                count, engine_actions = engine.broadcast_rendered(
                    payload, now=now, wall_time=wall_time
                )
                what, kind, channel = "broadcast", BROADCAST, link.channels.all
            case http_api.DisconnectCall(user_id=user_id):
                count, engine_actions = engine.disconnect_user(
                    user_id, now=now, wall_time=wall_time
                )
                what, kind, channel, payload = "disconnect", DISCONNECT, link.channels.user(user_id), b""
            case _:
                response, engine_actions = self._run_api_call(call, now, wall_time)
                self._respond(wire, response, now)
                return self._translate(engine_actions)
        actions = self._translate(engine_actions)
        self._next_token += 1
        token = self._next_token
        if link.publish(kind, channel, payload, token=token, now=now):
            # Answered by _drain_broker once Redis acknowledges it (or the link gives it up).
            self._awaiting[token] = (conn_id, what, count)
            self._pause(wire, PAUSE_ANSWER, actions)
            return actions
        self._respond(wire, http_api.cluster_response(what, count, "down"), now)
        return actions


    def start(self, *, now: float, wall_time: float) -> list[Action]:
        """Call once, when the adapter starts serving: a cluster node asks for its Redis
        connections here (``OpenConnection``); a single process has nothing to do."""
        self._check_poison()
        link = self.broker
        if link is None:
            return []
        if now > self._now:
            self._now = now
        try:
            return self._broker_outputs(
                link.start(now=now, wall_time=wall_time), now, wall_time
            ) + self._drain_broker(now, wall_time)
        except LocalProtocolError:
            raise
        except Exception as exc:  # a bug of ours in shared state (DESIGN.md §4)
            self._poisoned = exc
            raise

    def _broker_outputs(
        self, outputs: Sequence[LinkOutput | BrokerWrite], now: float, wall_time: float
    ) -> list[Action]:
        """The link's outputs as actions: messages from other nodes are delivered here."""
        actions: list[Action] = []
        engine = self.engine
        for output in outputs:
            if type(output) is not Inbound:
                if isinstance(output, BrokerConnect | BrokerWrite | BrokerClose):
                    self._broker_connection(output, actions)
                else:
                    actions.append(output)  # type: ignore[arg-type]  # notifications
                continue
            assert isinstance(output, Inbound)
            kind = output.kind
            if kind == PUBLISH:
                _count, engine_actions = engine.publish_rendered(
                    output.key, output.payload, now=now, wall_time=wall_time
                )
            elif kind in (BROADCAST, RELAY):
                _count, engine_actions = engine.broadcast_rendered(
                    output.payload, now=now, wall_time=wall_time
                )
            elif kind == SEND:
                _count, engine_actions = engine.send_to_user_rendered(
                    output.key, output.payload, now=now, wall_time=wall_time
                )
            else:
                _count, engine_actions = engine.disconnect_user(
                    output.key, now=now, wall_time=wall_time
                )
            if engine_actions:
                actions += self._translate(engine_actions)
        return actions

    def _broker_connection(
        self, order: BrokerConnect | BrokerWrite | BrokerClose, actions: list[Action]
    ) -> None:
        """The link's own vocabulary as connections like any other (one stream vocabulary)."""
        key = (order.role, order.generation)
        match order:
            case BrokerConnect(host=host, port=port):
                self._next_id += 1
                conn_id = self._next_id
                self._broker_conns[conn_id] = key
                self._broker_ids[key] = conn_id
                self._outputs.add(conn_id)
                actions.append(OpenConnection(conn_id=conn_id, host=host, port=port))
            case BrokerWrite(data=data):
                conn_id = self._broker_ids.get(key, 0)
                self._queue(conn_id, data, control=False)
            case BrokerClose(graceful=graceful):
                conn_id = self._broker_ids.get(key, 0)
                if not conn_id:
                    return
                if graceful:
                    self._close_output(conn_id)
                    return
                del self._broker_ids[key]
                del self._broker_conns[conn_id]
                self._outputs.by_id.pop(conn_id, None)
                actions.append(AbortTransport(conn_id=conn_id))

    def _drain_broker(self, now: float, wall_time: float) -> list[Action]:
        """Answer the HTTP calls Redis acknowledged (or the link gave up), then take the link's
        writes: one ``BrokerWrite`` per Redis connection for the whole call."""
        link = self.broker
        assert link is not None
        actions: list[Action] = []
        while answers := link.take_answers():
            for token, status in answers:
                waiting = self._awaiting.pop(token, None)
                if waiting is None:
                    continue
                conn_id, what, count = waiting
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is not WireState.HTTP or wire.request is None:
                    continue
                response = http_api.cluster_response(what, count, status)
                self._respond(wire, response, now)
                was_paused = wire.paused
                wire.paused &= ~PAUSE_ANSWER
                if wire.state is WireState.HTTP:
                    # Requests pipelined behind this one wait in h11's buffer.
                    actions += self._drive_http(wire, now, wall_time)
                if was_paused and not wire.paused and wire.state is WireState.HTTP:
                    actions.append(ResumeReading(conn_id=conn_id))
        for write in link.take_writes():
            self._broker_connection(write, actions)
        return actions + self._take_answered()  # the answers just given, with their call
