"""What the adapters drive: sockets' bytes in, socket actions out; engine, wire and HTTP API joined.

``TankServer`` owns one ``WireConnection`` per socket and the message-level ``Engine``. An adapter
calls ``accept()`` for each new socket, feeds events through ``receive()``, calls ``tick()`` when
``next_deadline()`` comes, and carries out the returned actions in order. Application commands
(``publish``, ``broadcast``, ...) return their actions too. Nothing here does I/O or reads a clock.

Fan-out: the engine renders the envelope once; here it is framed once (``frames.text_frame``) and
the same ``bytes`` goes to every subscriber in one ``SendBytesToEach`` (DESIGN.md §3).

With ``config.broker`` set, the server also owns a ``BrokerLink`` (docs/scale-out.md): publishes,
broadcasts, relays, sends to a user and disconnects go to the local connections first, then to the
other nodes through Redis; what other nodes send arrives through ``broker_received``. An HTTP
publish, broadcast or disconnect is answered once Redis has acknowledged it (``"broker": "up"``, or
``"partial"`` while nodes known before are missing), or at once when the link is down
(``"broker": "down"``: other nodes were not reached).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace

import h11
from wsproto.connection import ConnectionState as WsState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from . import http_api, static_files
from ._deadlines import Deadlines
from .actions import (
    AbortTransport,
    Action,
    AuthorizeUpgrade,
    BrokerRole,
    CloseTransport,
    DiscardPending,
    EngineAction,
    ErrorCode,
    ErrorOccurred,
    MessageReceived,
    PauseReading,
    ResumeReading,
    SendBytes,
    SendBytesToEach,
    SendControl,
    SendPing,
    SendText,
    SendTextToEach,
    StartClose,
    UpgradeRequest,
)
from .broker import BrokerLink, Inbound, LinkOutput
from .close_codes import MESSAGE_TOO_BIG, NO_STATUS
from .config import ServerConfig
from .engine import Engine, encode_text
from .envelope import BROADCAST, DISCONNECT, PUBLISH, RELAY, SEND
from .errors import LocalProtocolError
from .events import (
    BytesReceived,
    Event,
    Flushed,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
)
from .fastpath import OP_PONG, OP_TEXT, at_frame_boundary, next_frame
from .frames import ping_frame, pong_frame, text_frame
from .handshake import accept_key, origin_allowed, split_target, upgrade_problem
from .stats import ServerStats
from .wire import MAX_CONTROL_BACKLOG, WireConnection, WireState

__all__ = ["TankServer"]

_SERVER_HEADER = ("server", "tank-python")


class TankServer:
    """The sans-IO server: one per process (or per listening endpoint)."""

    def __init__(self, config: ServerConfig | None = None, *, rng: random.Random | None = None):
        self.config = config if config is not None else ServerConfig()
        rng = rng if rng is not None else random.Random()
        broker = self.config.broker
        #: The Redis link of a cluster node; None for a single process (the in-memory default).
        self.broker: BrokerLink | None = None if broker is None else BrokerLink(broker, rng=rng)
        self.engine = Engine(self.config, rng=rng, interest=self.broker)
        #: HTTP answers waiting for Redis: token -> (conn_id, what, count).
        self._awaiting: dict[int, tuple[int, str, int]] = {}
        #: HTTP connections whose reading is paused until their answer is sent.
        self._paused_for_answer: set[int] = set()
        self._next_token = 0
        self._wires: dict[int, WireConnection] = {}
        #: Per-socket deadlines outside the engine: an HTTP request's time limit, or the time a
        #: closing socket has to be reported gone before it is aborted.
        self._request_deadlines = Deadlines()
        self._now = -float("inf")
        self._next_id = 0
        self.http_requests = 0
        self.messages_dropped = 0
        self._poisoned: BaseException | None = None

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
        return a

    @property
    def shutting_down(self) -> bool:
        return self.engine.shutting_down

    @property
    def finished(self) -> bool:
        """True once shutdown has begun and every WebSocket connection has ended."""
        return self.engine.shutting_down and self.engine.connection_count == 0

    def connection_ids(self) -> tuple[int, ...]:
        """Every socket the server still tracks (HTTP and WebSocket)."""
        return tuple(self._wires)

    def stats(self) -> ServerStats:
        stats = replace(
            self.engine.stats(),
            http_requests=self.http_requests,
            messages_dropped=self.messages_dropped,
        )
        link = self.broker
        if link is None:
            return stats
        return replace(
            stats,
            broker_up=link.up,
            broker_reconnects=link.reconnects,
            broker_gaps=link.gaps,
            broker_missed=link.missed,
            broker_buffered=link.buffered,
            broker_dropped=link.dropped,
            broker_duplicates=link.duplicates,
            broker_published=link.published,
            broker_received=link.received_messages,
            broker_nodes=link.members or 0,
            broker_nodes_expected=link.expected_members,
        )

    # ------------------------------------------------------------------ transport events

    def accept(self, *, peer_host: str, now: float) -> int:
        """A new socket was accepted; returns the id to use in its events."""
        self._check_poison()
        self._next_id += 1
        conn_id = self._next_id
        self._now = max(self._now, now)
        self._wires[conn_id] = WireConnection(conn_id, peer_host, self.config.max_message_size)
        self._request_deadlines.set(conn_id, now + self.config.request_timeout)
        return conn_id

    def receive(self, event: Event) -> list[Action]:
        """Feed one transport event; returns the actions to carry out, in order."""
        self._check_poison()
        try:
            actions = self._receive(event)
            if self.broker is not None:
                actions += self._drain_broker(self._now, getattr(event, "wall_time", 0.0))
            return actions
        except LocalProtocolError:
            raise
        except Exception as exc:  # a bug of ours in shared state: stop serving (DESIGN.md §4)
            self._poisoned = exc
            raise

    def flushed(self, conn_id: int, data_bytes: int, control_bytes: int = 0) -> None:
        """Fast path for ``receive(Flushed(...))`` (it never returns actions): the hot loop of a
        fan-out reports one write per subscriber, so adapters may skip building the event."""
        if control_bytes:
            wire = self._wires.get(conn_id)
            if wire is not None:
                left = wire.control_backlog - control_bytes
                wire.control_backlog = left if left > 0 else 0
        if data_bytes:
            self.engine.flushed(conn_id, data_bytes)

    def flushed_each(self, conn_ids: Iterable[int], data_bytes: int) -> None:
        """``data_bytes`` of data lane written for each of ``conn_ids`` (one ``SendBytesToEach``
        handed to every transport at once)."""
        self.engine.flushed_each(conn_ids, data_bytes)

    def _receive(self, event: Event) -> list[Action]:
        now_seen = getattr(event, "now", None)
        if isinstance(now_seen, float | int) and now_seen > self._now:
            self._now = now_seen
        match event:
            case BytesReceived(conn_id=conn_id, data=data, now=now, wall_time=wall_time):
                wire = self._wires.get(conn_id)
                if not data:
                    return []  # nothing arrived (EOF is TransportClosed, never empty bytes)
                if wire is None or wire.state is WireState.CLOSED:
                    return []  # a race with our close
                if wire.state is WireState.WEBSOCKET:
                    return self._websocket_bytes(wire, data, now, wall_time)
                wire.http_conn().receive_data(data)
                if wire.state is WireState.AUTHORIZING:
                    return []  # kept until the verdict; reading is paused
                return self._drive_http(wire, now, wall_time)
            case TransportClosed(
                conn_id=conn_id, now=now, wall_time=wall_time, error=error, write_failed=wf
            ):
                wire = self._wires.pop(conn_id, None)
                if wire is None:
                    return []
                self._request_deadlines.discard(conn_id)
                if wire.state is WireState.WEBSOCKET:
                    return self._translate(
                        self.engine.transport_closed(
                            conn_id, now=now, wall_time=wall_time, error=error, write_failed=wf
                        )
                    )
                return []
            case Flushed(conn_id=conn_id, data_bytes=data_bytes, control_bytes=control_bytes):
                self.flushed(conn_id, data_bytes, control_bytes)
                return []
            case UpgradeAuthorized(conn_id=conn_id, now=now, wall_time=wall_time):
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is WireState.CLOSED:
                    return []  # closed meanwhile (request_timeout, EOF)
                if wire.state is not WireState.AUTHORIZING:
                    raise LocalProtocolError(f"connection {conn_id} is not waiting for a verdict")
                actions: list[Action] = [ResumeReading(conn_id=conn_id)]
                return actions + self._upgrade(wire, now, wall_time)
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
                return actions + self._refuse(wire, http_api.text_response(status, reason))
            case _:
                raise LocalProtocolError(f"not a Tank event: {event!r}")

    # ------------------------------------------------------------------ HTTP phase

    def _drive_http(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        actions: list[Action] = []
        http = wire.http_conn()
        while wire.state is WireState.HTTP:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if 400 <= exc.error_status_hint <= 599 else 400
                actions += self._refuse(wire, http_api.error_response(status, str(exc)))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                wire.request = event
                wire.request_body = bytearray()
            elif isinstance(event, h11.Data):
                wire.request_body += event.data
                if len(wire.request_body) > self.config.max_request_size:
                    actions += self._refuse(
                        wire, http_api.error_response(413, "request body too large")
                    )
                    break
            elif isinstance(event, h11.EndOfMessage):
                actions += self._handle_request(wire, now, wall_time)
            elif isinstance(event, h11.ConnectionClosed):
                actions.append(self._drop(wire, graceful=True))
                break
        return actions

    def _handle_request(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        request = wire.request
        assert request is not None
        self.http_requests += 1
        path, query = split_target(request.target)
        headers = list(request.headers)
        if path == self.config.path:
            return self._handle_upgrade(wire, request, path, query, headers, now, wall_time)
        if static_files.is_static_path(path):
            static = static_files.route_static(
                method=request.method.decode("latin-1"),
                path=path,
                query=query,
                headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
                peer_host=wire.peer_host,
                config=self.config,
            )
            if static is not None:
                return self._respond(wire, static, now)
        if not http_api.is_api_path(path):
            return self._respond(wire, http_api.not_found_response(), now)
        routed = http_api.route_api(
            method=request.method.decode("latin-1"),
            path=path,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
            body=bytes(wire.request_body),
            peer_host=wire.peer_host,
            config=self.config,
        )
        if isinstance(routed, http_api.HttpResponse):
            return self._respond(wire, routed, now)
        if self.broker is not None:
            return self._run_cluster_api_call(routed, wire, now, wall_time)
        response, engine_actions = self._run_api_call(routed, now, wall_time)
        return self._translate(engine_actions) + self._respond(wire, response, now)

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
                    return self._respond(wire, response, now)
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
                return self._translate(engine_actions) + self._respond(wire, response, now)
        actions = self._translate(engine_actions)
        self._next_token += 1
        token = self._next_token
        if link.publish(kind, channel, payload, token=token, now=now):
            # Answered by _drain_broker once Redis acknowledges it (or the link gives it up).
            self._awaiting[token] = (conn_id, what, count)
            if conn_id not in self._paused_for_answer:
                self._paused_for_answer.add(conn_id)
                actions.append(PauseReading(conn_id=conn_id))
            return actions
        return actions + self._respond(wire, http_api.cluster_response(what, count, "down"), now)

    def _run_api_call(
        self, call: http_api.ApiCall, now: float, wall_time: float
    ) -> tuple[http_api.HttpResponse, list[EngineAction]]:
        engine = self.engine
        match call:
            case http_api.PublishCall(topic=topic, data=data):
                delivered, actions = engine.publish(topic, data, now=now, wall_time=wall_time)
                return http_api.publish_response(delivered), actions
            case http_api.BroadcastCall(data=data):
                try:
                    delivered, actions = engine.broadcast(data, now=now, wall_time=wall_time)
                except LocalProtocolError:
                    return http_api.error_response(400, "field 'data' is not valid Unicode"), []
                return http_api.broadcast_response(delivered), actions
            case http_api.DisconnectCall(user_id=user_id):
                closed, actions = engine.disconnect_user(user_id, now=now, wall_time=wall_time)
                return http_api.disconnect_response(closed), actions
            case http_api.StatsCall():
                return http_api.stats_response(self.stats()), []
            case http_api.MetricsCall():
                return http_api.metrics_response(self.stats()), []

    def _handle_upgrade(
        self,
        wire: WireConnection,
        request: h11.Request,
        path: str,
        query: tuple[tuple[str, str], ...],
        headers: list[tuple[bytes, bytes]],
        now: float,
        wall_time: float,
    ) -> list[Action]:
        problem = upgrade_problem(request.method, request.http_version, headers)
        if problem is not None:
            # PROTOCOL.md: a request that is not a valid upgrade on the WebSocket path gets 400.
            extra = (("sec-websocket-version", "13"),) if "Version" in problem else ()
            response = http_api.error_response(400, problem, headers=extra)
            return [self._upgrade_failed(wire, problem, wall_time), *self._refuse(wire, response)]
        if not origin_allowed(headers, self.config.allowed_origins):
            problem = "origin not allowed"
            response = http_api.text_response(403, "Forbidden")
            return [self._upgrade_failed(wire, problem, wall_time), *self._refuse(wire, response)]
        if self.engine.shutting_down:
            response = http_api.text_response(503, "Server is shutting down")
            return self._refuse(wire, response)
        user_id = next((value for key, value in query if key == "user_id"), "")
        # PROTOCOL.md [ref]: missing or empty user_id -> the server invents one.
        wire.user_id = user_id or self.engine.generate_user_id()
        if not self.config.authenticate:
            return self._upgrade(wire, now, wall_time)
        wire.state = WireState.AUTHORIZING
        upgrade_request = UpgradeRequest(
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            path=path,
            query=query,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
            peer_host=wire.peer_host,
            user_id=wire.user_id,
        )
        return [
            PauseReading(conn_id=wire.conn_id),
            AuthorizeUpgrade(conn_id=wire.conn_id, request=upgrade_request),
        ]

    def _upgrade_failed(self, wire: WireConnection, problem: str, wall_time: float) -> Action:
        return ErrorOccurred(
            code=ErrorCode.UPGRADE_FAILED,
            message=f"upgrade failed: {problem}",
            conn_id=None,
            user_id=None,
            wall_time=wall_time,
        )

    def _upgrade(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        if self.engine.shutting_down:
            return self._refuse(wire, http_api.text_response(503, "Server is shutting down"))
        request = wire.request
        assert request is not None
        key = next(v for k, v in request.headers if k == b"sec-websocket-key")
        # PROTOCOL.md [ref]: no subprotocol and no extension is negotiated, whatever was offered.
        response = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", accept_key(key)),
            ],
        )
        http = wire.http_conn()
        head = http.send(response)
        assert head is not None
        trailing, _closed = http.trailing_data
        wire.start_websocket()
        self._request_deadlines.discard(wire.conn_id)
        actions: list[Action] = [SendControl(conn_id=wire.conn_id, data=head)]
        actions += self._translate(
            self.engine.open(
                wire.conn_id,
                user_id=wire.user_id,
                peer_host=wire.peer_host,
                now=now,
                wall_time=wall_time,
            )
        )
        if trailing:
            actions += self._websocket_bytes(wire, bytes(trailing), now, wall_time)
        return actions

    def _respond(
        self, wire: WireConnection, response: http_api.HttpResponse, now: float
    ) -> list[Action]:
        """Answer an HTTP request; keep the connection for the next one when HTTP allows."""
        http = wire.http_conn()
        data = self._serialize(wire, response, close=False)
        actions: list[Action] = [SendControl(conn_id=wire.conn_id, data=data)]
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            wire.request = None
            self._request_deadlines.set(wire.conn_id, now + self.config.request_timeout)
        else:
            actions.append(self._drop(wire, graceful=True))
        return actions

    def _refuse(self, wire: WireConnection, response: http_api.HttpResponse) -> list[Action]:
        """Answer with an error and close the connection."""
        actions: list[Action] = []
        if wire.http_conn().our_state in (h11.IDLE, h11.SEND_RESPONSE):
            data = self._serialize(wire, response, close=True)
            actions.append(SendControl(conn_id=wire.conn_id, data=data))
        actions.append(self._drop(wire, graceful=True))
        return actions

    def _serialize(
        self, wire: WireConnection, response: http_api.HttpResponse, *, close: bool
    ) -> bytes:
        http = wire.http_conn()
        headers = [(name.encode("latin-1"), value.encode("latin-1"))
                   for name, value in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        headers.append((_SERVER_HEADER[0].encode(), _SERVER_HEADER[1].encode()))
        if close:
            headers.append((b"connection", b"close"))
        # A HEAD request gets the headers of the GET answer and no body (RFC 9110 §9.3.2).
        body = response.body if wire.request is None or wire.request.method != b"HEAD" else b""
        chunks = [
            http.send(h11.Response(status_code=response.status, headers=headers)),
            http.send(h11.Data(data=body)) if body else b"",
            http.send(h11.EndOfMessage()),
        ]
        return b"".join(chunk for chunk in chunks if chunk)

    def _drop(self, wire: WireConnection, *, graceful: bool) -> Action:
        """Close a socket that never became (or no longer is) a WebSocket."""
        if graceful:
            self._linger(wire.conn_id)
            return CloseTransport(conn_id=wire.conn_id)
        self._forget_wire(wire.conn_id)
        return AbortTransport(conn_id=wire.conn_id)

    def _linger(self, conn_id: int) -> None:
        wire = self._wires.get(conn_id)
        if wire is not None and wire.state is not WireState.CLOSED:
            wire.release()
            self._request_deadlines.set(conn_id, self._now + self.config.close_timeout)

    def _forget_wire(self, conn_id: int) -> None:
        self._wires.pop(conn_id, None)
        self._request_deadlines.discard(conn_id)

    # ------------------------------------------------------------------ WebSocket phase

    def _websocket_bytes(
        self, wire: WireConnection, data: bytes, now: float, wall_time: float
    ) -> list[Action]:
        engine = self.engine
        conn_id = wire.conn_id
        ws = wire.ws
        assert ws is not None
        engine.touch(conn_id, now)  # any byte is a sign of life, even half a frame
        actions: list[Action] = []
        if ws.state is WsState.OPEN and at_frame_boundary(ws) and not wire.assembler.parts:
            # The common frames skip wsproto (fastpath.py); the first other one goes on below.
            pos = 0
            limit = self.config.max_message_size
            while (frame := next_frame(data, pos, limit)) is not None:
                opcode, payload, pos = frame
                if opcode == OP_TEXT:
                    actions += self._data_fragment(wire, payload, False, True, now, wall_time)
                    if wire.state is not WireState.WEBSOCKET:
                        return actions
                elif opcode == OP_PONG:
                    engine.pong_received(conn_id, payload, now=now)
                else:
                    self._answer_ping(wire, payload, actions)
            if pos:
                if pos == len(data):
                    return actions
                data = data[pos:]
        ws.receive_data(data)
        for event in ws.events():
            if wire.state is not WireState.WEBSOCKET:
                break  # closed by an earlier event of this batch: ignore the rest
            match event:
                case TextMessage(data=text, message_finished=finished):
                    chunk = text.encode()
                    actions += self._data_fragment(wire, chunk, False, finished, now, wall_time)
                case BytesMessage(data=raw, message_finished=finished):
                    actions += self._data_fragment(wire, bytes(raw), True, finished, now, wall_time)
                case Ping(payload=payload):
                    self._answer_ping(wire, bytes(payload), actions)
                case Pong(payload=payload):
                    engine.pong_received(conn_id, bytes(payload), now=now)
                case CloseConnection(code=code, reason=reason):
                    if ws.state is WsState.OPEN:
                        # wsproto reports a parse failure as a CloseConnection while still OPEN.
                        actions += self._translate(
                            engine.protocol_failed(
                                conn_id, code, reason or "", now=now, wall_time=wall_time
                            )
                        )
                    else:
                        peer_code = None if code == NO_STATUS else int(code)
                        actions += self._translate(
                            engine.close_received(
                                conn_id, peer_code, reason or "", now=now, wall_time=wall_time
                            )
                        )
                case _:
                    pass
        return actions

    def _answer_ping(self, wire: WireConnection, payload: bytes, actions: list[Action]) -> None:
        # RFC 6455 §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
        # response" - answered here, never waiting for the application. A peer that pings and
        # never reads gets no more Pongs past MAX_CONTROL_BACKLOG (§5.5.3: only the latest).
        if self.engine.is_open(wire.conn_id) and wire.control_backlog < MAX_CONTROL_BACKLOG:
            frame = pong_frame(payload)
            wire.control_backlog += len(frame)
            actions.append(SendControl(conn_id=wire.conn_id, data=frame))

    def _data_fragment(
        self,
        wire: WireConnection,
        chunk: bytes,
        binary: bool,
        finished: bool,
        now: float,
        wall_time: float,
    ) -> list[Action]:
        if not wire.assembler.add(chunk, binary=binary):
            # PROTOCOL.md, Limits: a message larger than max_message_size -> close 1009.
            reason = f"message larger than {self.config.max_message_size} bytes"
            return self._translate(
                self.engine.protocol_failed(
                    wire.conn_id, MESSAGE_TOO_BIG, reason, now=now, wall_time=wall_time
                )
            )
        if not finished:
            return []
        payload = wire.assembler.finish()
        if payload is None:
            # PROTOCOL.md [fix]: a binary message that is not valid UTF-8 is dropped.
            self.messages_dropped += 1
            return []
        return self._translate(
            self.engine.message_received(wire.conn_id, payload, now=now, wall_time=wall_time)
        )

    # ------------------------------------------------------------------ engine -> bytes

    def _translate(self, engine_actions: list[EngineAction]) -> list[Action]:
        actions: list[Action] = []
        append = actions.append
        # The same payload object (a text heartbeat, one relay) is framed once per batch.
        last_payload: bytes | None = None
        last_frame = b""
        last_ping: bytes | None = None
        last_ping_frame = b""
        for action in engine_actions:
            match action:
                case SendTextToEach(conn_ids=conn_ids, payload=payload):
                    append(SendBytesToEach(conn_ids=conn_ids, data=text_frame(payload)))
                case SendText(conn_id=conn_id, payload=payload):
                    if payload is not last_payload:
                        last_payload, last_frame = payload, text_frame(payload)
                    append(SendBytes(conn_id=conn_id, data=last_frame))
                case SendPing(conn_id=conn_id, payload=payload):
                    ping_wire = self._wires.get(conn_id)
                    if ping_wire is None or ping_wire.control_backlog >= MAX_CONTROL_BACKLOG:
                        continue  # a peer that reads nothing gets no more Pings: it will time out
                    if payload is not last_ping:
                        last_ping, last_ping_frame = payload, ping_frame(payload)
                    ping_wire.control_backlog += len(last_ping_frame)
                    append(SendControl(conn_id=conn_id, data=last_ping_frame))
                case StartClose(
                    conn_id=conn_id, code=code, reason=reason, discard_pending=discard
                ):
                    wire = self._wires.get(conn_id)
                    if wire is None or wire.ws is None:
                        continue
                    if discard:
                        append(DiscardPending(conn_id=conn_id))
                    # wsproto tests `is CloseReason.NO_STATUS_RCVD` and turns a plain 1005 into 1000
                    # (wsproto #182): pass the enum member to get the empty body the peer sent.
                    close_code = CloseReason.NO_STATUS_RCVD if code is None else code
                    frame = wire.ws.send(CloseConnection(code=close_code, reason=reason or None))
                    append(SendBytes(conn_id=conn_id, data=bytes(frame)))
                case CloseTransport(conn_id=conn_id):
                    self._linger(conn_id)
                    append(action)
                case AbortTransport(conn_id=conn_id):
                    self._forget_wire(conn_id)
                    append(action)
                case MessageReceived(conn_id=conn_id, data=data):
                    if self.broker is not None and self.config.relay:
                        # PROTOCOL.md case 4 on every node; the sender is on this one only.
                        self.broker.publish(
                            RELAY, self.broker.channels.all, data, exclude=conn_id, now=self._now
                        )
                    append(action)
                case _:
                    append(action)
        return actions

    # ------------------------------------------------------------------ time

    def tick(self, now: float, *, wall_time: float) -> list[Action]:
        """Service everything due by ``now`` (pings, timeouts, stale HTTP requests)."""
        self._check_poison()
        if now > self._now:
            self._now = now
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
                    actions.append(self._drop(wire, graceful=True))
            if self.broker is not None:
                actions += self._drain_broker(now, wall_time)
            return actions
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
                actions.append(self._drop(wire, graceful=True))
        if self.broker is not None:
            self.broker.announce_leave(now=now)
            actions += self._drain_broker(now, wall_time)
            actions += self.broker.stop(now=now, wall_time=wall_time)
            self._awaiting.clear()
        return actions

    # ------------------------------------------------------------------ the broker link

    def broker_start(self, *, now: float, wall_time: float) -> list[Action]:
        """Start the broker link (when ``config.broker`` is set): the adapter calls this once,
        when the server starts. Returns the ``BrokerConnect`` actions."""
        self._check_poison()
        if self.broker is None:
            return []
        return self._guarded(
            lambda link: self._broker_outputs(link.start(now=now, wall_time=wall_time), now,
                                              wall_time),
            now,
            wall_time,
        )

    def broker_opened(
        self, role: BrokerRole, generation: int, *, now: float, wall_time: float
    ) -> list[Action]:
        """The Redis connection asked for by ``BrokerConnect`` is open."""
        self._check_poison()
        return self._guarded(
            lambda link: self._broker_outputs(
                link.opened(role, generation, now=now, wall_time=wall_time), now, wall_time
            ),
            now,
            wall_time,
        )

    def broker_received(
        self, role: BrokerRole, generation: int, data: bytes, *, now: float, wall_time: float
    ) -> list[Action]:
        """Bytes arrived on a Redis connection."""
        self._check_poison()
        return self._guarded(
            lambda link: self._broker_outputs(
                link.received(role, generation, data, now=now, wall_time=wall_time),
                now,
                wall_time,
            ),
            now,
            wall_time,
        )

    def broker_closed(
        self,
        role: BrokerRole,
        generation: int,
        *,
        now: float,
        wall_time: float,
        error: str | None = None,
    ) -> list[Action]:
        """A Redis connection is gone (EOF, reset, a write error) or could not be opened."""
        self._check_poison()
        return self._guarded(
            lambda link: self._broker_outputs(
                link.closed(role, generation, now=now, wall_time=wall_time, error=error),
                now,
                wall_time,
            ),
            now,
            wall_time,
        )

    def _guarded(
        self, call: Callable[[BrokerLink], list[Action]], now: float, wall_time: float
    ) -> list[Action]:
        link = self.broker
        if link is None:
            return []  # no broker: nothing was ever asked of the adapter
        if now > self._now:
            self._now = now
        try:
            return call(link) + self._drain_broker(now, wall_time)
        except LocalProtocolError:
            raise
        except Exception as exc:  # a bug of ours in shared state (DESIGN.md §4)
            self._poisoned = exc
            raise

    def _broker_outputs(
        self, outputs: list[LinkOutput], now: float, wall_time: float
    ) -> list[Action]:
        """The link's outputs as actions: messages from other nodes are delivered here."""
        actions: list[Action] = []
        engine = self.engine
        for output in outputs:
            if type(output) is not Inbound:
                actions.append(output)  # type: ignore[arg-type]  # Broker* actions, notifications
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
                    self._paused_for_answer.discard(conn_id)
                    continue
                response = http_api.cluster_response(what, count, status)
                actions += self._respond(wire, response, now)
                self._paused_for_answer.discard(conn_id)
                if wire.state is WireState.HTTP:
                    # Requests pipelined behind this one wait in h11's buffer.
                    actions += self._drive_http(wire, now, wall_time)
                if conn_id not in self._paused_for_answer and wire.state is WireState.HTTP:
                    actions.append(ResumeReading(conn_id=conn_id))
        actions += link.take_writes()
        return actions

    def _check_poison(self) -> None:
        if self._poisoned is not None:
            raise LocalProtocolError(
                "the server failed earlier and cannot be used; see the chained exception"
            ) from self._poisoned
