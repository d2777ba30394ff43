"""The HTTP phase of a socket: h11's request loop, the router, the upgrade, the answers.

A request on the WebSocket path is an upgrade (validated, origin-checked, authenticated when the
application asked for it, then 101 and the WebSocket phase); ``/tank.js`` and ``/`` are static; the
``/api`` and ``/metrics`` calls go to ``http_api``; anything else is 404. Answers go on the control
lane; a connection HTTP lets us keep waits for its next request under ``request_timeout``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from http import HTTPStatus

import h11

from ..actions import Action, AuthorizeUpgrade, EngineAction, UpgradeRequest
from ..errors import LocalProtocolError
from ..notifications import ErrorCode, ErrorOccurred, HttpRequestAnswered
from ..wire.connection import WireConnection, WireState
from ..wire.deflate import DeflateExtension
from ..wire.deflate_offer import DeflateParams, negotiate
from ..wire.handshake import (
    accept_key,
    header_tokens,
    origin_allowed,
    split_target,
    upgrade_problem,
)
from ..wire.recovery import SUBPROTOCOL
from . import http_api, reports, static_files
from .api_guard import forwarded_for, has_forwarded_for
from .pacing import PAUSE_AUTH, PAUSE_PIPELINE
from .websocket import WebSocketPhase

#: ``client_host`` of a request through a trusted proxy that did not say for whom: not loopback.
UNKNOWN_CLIENT = "unknown"
#: HTTP answers a connection may leave untaken before its pipelined requests wait (bytes).
ANSWER_BACKLOG = 65_536
#: Largest request head (request line and headers), as h11 bounds incomplete ones (RFC 6585 §5:
#: 431 Request Header Fields Too Large).
MAX_HEAD_SIZE = 16_384


def _reason(status: int) -> bytes:
    """The status line's reason phrase (RFC 9110 §15): ``200 OK``, not ``200 ``."""
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


def _head_size(request: h11.Request) -> int:
    """The head's size as sent, give or take the whitespace h11 dropped."""
    size = len(request.method) + len(request.target) + 12
    for name, value in request.headers:
        size += len(name) + len(value) + 4
    return size

_SERVER_HEADER = ("server", "tank-python")


class HttpPhase(WebSocketPhase):
    """Bytes of a socket before (or instead of) the upgrade."""

    def _drive_http(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        actions: list[Action] = []
        http = wire.http_conn()
        while wire.state is WireState.HTTP and not wire.paused & PAUSE_PIPELINE:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if 400 <= exc.error_status_hint <= 599 else 400
                self._refuse(wire, http_api.error_response(status, str(exc)))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                if _head_size(event) > MAX_HEAD_SIZE:
                    # h11 bounds a head only while it is incomplete; one that arrives whole in a
                    # single read is measured here, so every transport answers the same.
                    self._refuse(wire, http_api.error_response(431, "request head too large"))
                    break
                wire.request = event
                wire.request_body = bytearray()
            elif isinstance(event, h11.Data):
                wire.request_body += event.data
                if len(wire.request_body) > self.config.max_request_size:
                    self._refuse(wire, http_api.error_response(413, "request body too large"))
                    break
            elif isinstance(event, h11.EndOfMessage):
                actions += self._handle_request(wire, now, wall_time)
                output = self._outputs.by_id.get(wire.conn_id)
                if (
                    wire.state is WireState.HTTP
                    and output is not None
                    and output.control_bytes >= ANSWER_BACKLOG
                ):
                    # Pipelined requests wait (unread) until these answers are taken, so a client
                    # that never reads them costs at most this much (issue 10).
                    self._pause(wire, PAUSE_PIPELINE, actions)
                    output.watch = True
            elif isinstance(event, h11.ConnectionClosed):
                self._linger(wire.conn_id)
                break
        return actions

    def _handle_request(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        request = wire.request
        assert request is not None
        self.http_requests += 1
        path, query = split_target(request.target)
        headers = list(request.headers)
        if wire.peer_host in self.config.trusted_proxies:
            # Each request says anew who it is for. Without the header it came straight from that
            # address (a program beside the proxy: the proxy always adds one); with one we cannot
            # read, from nobody in particular, never the proxy's own loopback address.
            wire.client_host = forwarded_for(headers) or (
                UNKNOWN_CLIENT if has_forwarded_for(headers) else wire.peer_host
            )
        if path == self.config.path:
            return self._handle_upgrade(wire, request, path, query, headers, now, wall_time)
        if static_files.is_static_path(path):
            static = static_files.route_static(
                method=request.method.decode("latin-1"),
                path=path,
                query=query,
                headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
                peer_host=wire.client_host,
                config=self.config,
            )
            if static is not None:
                self._respond(wire, static, now)
                return []
        if not http_api.is_api_path(path):
            self._respond(wire, http_api.not_found_response(), now)
            return []
        routed = http_api.route_api(
            method=request.method.decode("latin-1"),
            path=path,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
            body=bytes(wire.request_body),
            peer_host=wire.client_host,
            config=self.config,
            query=query,
        )
        if isinstance(routed, http_api.HttpResponse):
            self._respond(wire, routed, now)
            return []
        if self.broker is not None:
            return self._run_cluster_api_call(routed, wire, now, wall_time)
        response, engine_actions = self._run_api_call(routed, now, wall_time)
        self._respond(wire, response, now)
        return self._translate(engine_actions)

    @abstractmethod
    def _run_cluster_api_call(
        self, call: http_api.ApiCall, wire: WireConnection, now: float, wall_time: float
    ) -> list[Action]:
        """An API call on a cluster node (``cluster.py``)."""

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
                most = self.config.limits.max_stats_entries
                return reports.stats_response(self.stats(), most), []
            case http_api.MetricsCall():
                most = self.config.limits.max_stats_entries
                return reports.metrics_response(self.stats(), most), []
            case http_api.PresenceCall(topic=topic):
                most = self.config.limits.max_stats_entries
                return reports.presence_response(topic, engine.presence(topic), most), []
            case http_api.HistoryCall(topic=topic, since=since, epoch=epoch, limit=limit):
                assert engine.history is not None  # route_api answers 404 without history
                read = engine.history.read(topic, since=since, epoch=epoch, limit=limit, now=now)
                return reports.history_response(read), []
            case http_api.ReadyCall():
                if engine.shutting_down:
                    return http_api.text_response(503, "shutting down"), []
                if self.broker is not None and not self.broker.up:
                    return http_api.text_response(503, "broker down"), []
                return http_api.text_response(200, "ready"), []

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
            self._refuse(wire, response)
            return [self._upgrade_failed(wire, problem, wall_time)]
        if not origin_allowed(headers, self.config.allowed_origins):
            problem = "origin not allowed"
            response = http_api.text_response(403, "Forbidden")
            self._refuse(wire, response)
            return [self._upgrade_failed(wire, problem, wall_time)]
        if self.engine.shutting_down:
            response = http_api.text_response(503, "Server is shutting down")
            self._refuse(wire, response)
            return []
        if self._address_full(wire):
            return []
        user_id = next((value for key, value in query if key == "user_id"), "")
        # PROTOCOL.md [ref]: missing or empty user_id -> the server invents one.
        wire.user_id = user_id or self.engine.generate_user_id()
        if not self.config.authenticate:
            return self._upgrade(wire, now, wall_time)
        wire.state = WireState.AUTHORIZING
        actions: list[Action] = []
        self._pause(wire, PAUSE_AUTH, actions)
        upgrade_request = UpgradeRequest(
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            path=path,
            query=query,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers),
            peer_host=wire.client_host,
            user_id=wire.user_id,
        )
        actions.append(AuthorizeUpgrade(conn_id=wire.conn_id, request=upgrade_request))
        return actions

    def _upgrade_failed(self, wire: WireConnection, problem: str, wall_time: float) -> Action:
        return ErrorOccurred(
            code=ErrorCode.UPGRADE_FAILED,
            message=f"upgrade failed: {problem}",
            conn_id=None,
            user_id=None,
            wall_time=wall_time,
        )

    def _address_full(self, wire: WireConnection) -> bool:
        """Limits: max_connections_per_address; when met, the upgrade is refused 503. Checked
        before asking the application and again after its verdict (others may have come in)."""
        most = self.config.limits.max_connections_per_address
        if most is None or self._per_address.get(wire.client_host, 0) < most:
            return False
        self._hit("max_connections_per_address")
        response = http_api.text_response(
            503, "Too many connections from this address", headers=(("retry-after", "10"),)
        )
        self._refuse(wire, response)
        return True

    def _upgrade(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        if self.engine.shutting_down:
            self._refuse(wire, http_api.text_response(503, "Server is shutting down"))
            return []
        if self._address_full(wire):
            return []
        request = wire.request
        assert request is not None
        key = next(v for k, v in request.headers if k == b"sec-websocket-key")
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_key(key)),
        ]
        # PROTOCOL.md [ref]: no subprotocol is negotiated; permessage-deflate is our [ext], only
        # for a client that offers it.
        # A transport that frames messages itself (ASGI) agrees its own extensions, if any.
        agreed = None if wire.message_level else self._agree_compression(request.headers)
        if agreed is not None:
            headers.append((b"sec-websocket-extensions", agreed[1].encode()))
        # Our recovery extension (wire/recovery.py), for a client that offers it (browsers fail a
        # handshake that ignores the subprotocol they offered, so it is agreed with or without a
        # history); PROTOCOL.md [ref]: any other subprotocol offered is not agreed.
        if SUBPROTOCOL in header_tokens(
            list(request.headers), b"sec-websocket-protocol"
        ):
            headers.append((b"sec-websocket-protocol", SUBPROTOCOL.encode()))
            wire.recovery = True
        response = h11.InformationalResponse(status_code=101, headers=headers)
        http = wire.http_conn()
        head = http.send(response)
        assert head is not None
        trailing, _closed = http.trailing_data
        if agreed is None:
            wire.start_websocket()
        else:
            params = agreed[0]
            limit = self.config.max_message_size
            wire.start_websocket(DeflateExtension(max_message_size=limit, params=params))
            self.compression.add(wire.conn_id, params.server_window)
        self._start_pacing(wire, now)
        self._count_address(wire.conn_id, wire.client_host)
        self._request_deadlines.discard(wire.conn_id)
        self._queue(wire.conn_id, head, control=True)
        actions = self._translate(
            self.engine.open(
                wire.conn_id,
                user_id=wire.user_id,
                peer_host=wire.client_host,
                now=now,
                wall_time=wall_time,
                watched=self.watch_framed_silence or not wire.message_level,
                pinged=not wire.message_level,  # its transport keeps Pings to itself
                recovery=wire.recovery,
            )
        )
        output = self._outputs.by_id.get(wire.conn_id)
        if output is not None and self.engine.state_of(wire.conn_id) is not None:
            output.account = self.engine.outbox_account(wire.conn_id)
        if trailing:
            actions += self._paced_websocket_bytes(wire, bytes(trailing), now, wall_time)
        return actions

    def _respond(self, wire: WireConnection, response: http_api.HttpResponse, now: float) -> None:
        """Answer an HTTP request; keep the connection for the next one when HTTP allows."""
        http = wire.http_conn()
        self._queue(wire.conn_id, self._serialize(wire, response, close=False), control=True)
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            wire.request = None
            self._request_deadlines.set(wire.conn_id, now + self.config.request_timeout)
        else:
            self._linger(wire.conn_id)

    def _agree_compression(
        self, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[DeflateParams, str] | None:
        """The permessage-deflate parameters agreed and the answer header, if any (an offer we
        cannot read or honour is declined, never refused: wire/deflate_offer.py)."""
        if not self.config.compression:
            return None
        offers = [v.decode("latin-1") for k, v in headers if k == b"sec-websocket-extensions"]
        return negotiate(offers) if offers else None

    def _refuse(self, wire: WireConnection, response: http_api.HttpResponse) -> None:
        """Answer with an error and close the connection."""
        if wire.http_conn().our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._queue(wire.conn_id, self._serialize(wire, response, close=True), control=True)
        self._linger(wire.conn_id)

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
        request = wire.request
        # A HEAD request gets the headers of the GET answer and no body (RFC 9110 §9.3.2).
        body = response.body if request is None or request.method != b"HEAD" else b""
        self._answered.append(HttpRequestAnswered(
            conn_id=wire.conn_id,
            peer_host=wire.client_host,
            method="" if request is None else request.method.decode("latin-1"),
            target="" if request is None else request.target.decode("latin-1"),
            status=response.status,
            wall_time=self._wall_time,
        ))
        chunks = [
            http.send(h11.Response(
                status_code=response.status, headers=headers, reason=_reason(response.status)
            )),
            http.send(h11.Data(data=body)) if body else b"",
            http.send(h11.EndOfMessage()),
        ]
        return b"".join(chunk for chunk in chunks if chunk)
