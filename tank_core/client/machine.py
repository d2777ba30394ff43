"""The client as a sans-IO state machine: handshake, topics, heartbeat, reconnect with backoff.

What the seed document promised and tank-websocket.js 2.0.3 never did (PROTOCOL.md, "Heartbeat"):
``{"type":"heartbeat"}`` and a Ping every ``heartbeat_interval``; when nothing at all has arrived for
``heartbeat_timeout`` the client reports it, drops the connection and reconnects. Reconnects use
exponential backoff with full jitter that only a stable connection resets (``backoff.py``), and
after each one every held topic is subscribed exactly once; each message produces exactly one
notification, however many reconnects happened (the reference multiplies callbacks).

``send()`` while disconnected queues up to ``send_queue_limit`` messages, written in order after
the next open; past the limit it raises ``LocalProtocolError``: nothing is dropped silently.

It speaks the stream vocabulary of the server (docs/client.md, "Adapter contract"): each attempt
is an ``OpenConnection`` with a fresh ``conn_id``, answered by ``ConnectionOpened``,
``BytesReceived`` and ``TransportClosed`` through ``receive`` (events for another ``conn_id`` are a
late answer to an attempt given up on, and ignored); ``AbortTransport`` drops a connection. What
to write waits here, on the lanes of ``output.py``, until the adapter takes it: ``take_ready()``
names the connections with something new, ``data_to_send(conn_id)`` gives the bytes, and ``None``
once the connection is to be closed after them. A connection closed that way that is not reported
gone within ``close_timeout`` is aborted.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections import deque
from http import HTTPStatus
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from ..actions import AbortTransport, OpenConnection
from ..config import ClientConfig
from ..errors import LocalProtocolError
from ..events import BytesReceived, ConnectionOpened, TransportClosed
from ..wire.close_codes import NORMAL, validate_close_code
from ..wire.deflate import DeflateExtension
from ..wire.recovery import SUBPROTOCOL
from .backoff import Backoff
from .connections import ClientConnections
from .inbox import Arrival, Inbox
from .notifications import (
    ClientNotification,
    Closed,
    HeartbeatTimedOut,
    LatencyMeasured,
    MessageArrived,
    Opened,
    Reconnecting,
    Welcomed,
    check_utf8,
)
from .positions import Positions

__all__ = ["ClientAction", "ClientEvent", "ClientState", "TankClient"]

_CLIENT_HEARTBEAT = '{"type":"heartbeat"}'
#: The reason of a connection the server ended without a closing handshake (an orderly EOF).
_EOF = "connection closed by the server"


class ClientState(enum.Enum):
    #: Not started yet.
    IDLE = "idle"
    #: Waiting for the adapter to open TCP (``OpenConnection`` was emitted).
    CONNECTING = "connecting"
    #: TCP is up; the upgrade request was queued, the 101 has not arrived.
    HANDSHAKING = "handshaking"
    #: Messages flow.
    OPEN = "open"
    #: Waiting out a backoff delay before the next attempt.
    WAITING = "waiting"
    #: ``close()`` queued our Close; waiting (at most ``close_timeout``) for the server's.
    CLOSING = "closing"
    #: Closed for good by ``close()`` (or reconnect switched off).
    CLOSED = "closed"


#: What the client's calls return: transport actions to carry out, then notifications.
ClientAction = OpenConnection | AbortTransport | ClientNotification
#: What the adapter feeds to ``TankClient.receive``.
ClientEvent = ConnectionOpened | BytesReceived | TransportClosed


class TankClient:
    """One logical client: connects, keeps its topics across reconnects, watches liveness."""

    def __init__(self, config: ClientConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        parts = urlsplit(config.url)
        self._secure = parts.scheme == "wss"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._secure else 80)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if config.user_id is not None:
            query = [(k, v) for k, v in query if k != "user_id"] + [("user_id", config.user_id)]
        if config.token is not None:
            query = [(k, v) for k, v in query if k != "token"] + [("token", config.token)]
        self._target = urlunsplit(("", "", parts.path or "/", urlencode(query), ""))
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self.state = ClientState.IDLE
        self._ws: WSConnection | None = None
        self._conns = ClientConnections()
        self._topics: dict[str, None] = {}
        #: Where each topic stands in the server's history (the recovery extension).
        self._positions = Positions()
        self._queue: deque[str] = deque()
        self._inbox = Inbox(config.max_message_size)
        self._now = -float("inf")
        self._deadline: float | None = None
        self._last_seen = 0.0
        self._next_heartbeat = 0.0
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_counter = 0
        self._backoff = Backoff(config, self._rng)
        self._opens = 0
        self._close_code = NORMAL
        self._close_reason = ""
        self.user_id: str | None = config.user_id
        self.latency: float | None = None

    # -------------------------------------------------------------- queries

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics held (resubscribed after every reconnect)."""
        return tuple(self._topics)

    @property
    def queued(self) -> int:
        """Messages waiting for a connection."""
        return len(self._queue)

    @property
    def opens(self) -> int:
        """How many times the WebSocket opened (1 + reconnects)."""
        return self._opens

    @property
    def conn_id(self) -> int | None:
        """The connection of the current attempt; None between attempts."""
        return self._conns.current

    @property
    def buffered(self) -> int:
        """Bytes waiting in the core for the current connection (not yet taken)."""
        return self._conns.buffered

    @property
    def finished(self) -> bool:
        """Closed for good, and every connection it opened was reported gone or aborted."""
        conns = self._conns
        return self.state is ClientState.CLOSED and conns.current is None and not conns.draining

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work; None for never. Pure."""
        deadline = self._deadline
        drain = self._conns.next_deadline()
        if drain is not None and (deadline is None or drain < deadline):
            return drain
        return deadline

    # -------------------------------------------------------------- output

    def take_ready(self) -> list[int]:
        """The connections given something to write (or to close) since the last call, each once."""
        return self._conns.take_ready()

    def data_to_send(self, conn_id: int, max_bytes: int | None = None) -> bytes | None:
        """Take what waits for ``conn_id``: control frames first, then whole frames (about
        ``max_bytes`` of them when given). ``b""``: nothing now. None: nothing more will ever come;
        close the transport once what was taken before is written (and report it gone)."""
        return self._conns.data_to_send(conn_id, max_bytes)

    def _text(self, text: str) -> None:
        assert self._ws is not None
        self._conns.write(self._ws.send(Message(data=text)))

    # -------------------------------------------------------------- commands

    def start(self, *, now: float) -> list[ClientAction]:
        """Begin the first connection attempt."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError(f"start() called in state {self.state.value}; call it once")
        self._advance(now)
        return self._connect(now)

    def subscribe(self, topic: str, *, now: float) -> list[ClientAction]:
        """Hold ``topic``: subscribed now if open, and again after every reconnect."""
        self._check_topic(topic)
        self._check_not_closed("subscribe")
        self._advance(now)
        if topic not in self._topics:
            self._topics[topic] = None
            if self.state is ClientState.OPEN:
                self._text(self._positions.subscribe_text(topic))
        return []

    def unsubscribe(self, topic: str, *, now: float) -> list[ClientAction]:
        """Stop holding ``topic``."""
        self._check_topic(topic)
        self._check_not_closed("unsubscribe")
        self._advance(now)
        if topic in self._topics:
            del self._topics[topic]
            self._positions.forget(topic)
            if self.state is ClientState.OPEN:
                self._text("unsub:" + topic)
        return []

    def send(self, text: str, *, now: float) -> list[ClientAction]:
        """Send an application message (relayed by the server to every other client)."""
        if not isinstance(text, str):
            raise LocalProtocolError(f"send() takes a str, got {type(text).__name__}")
        check_utf8(text, "send() text")
        self._check_not_closed("send")
        self._advance(now)
        if self.state is ClientState.OPEN:
            self._text(text)
            return []
        if len(self._queue) >= self.config.send_queue_limit:
            raise LocalProtocolError(
                f"not connected and {len(self._queue)} messages are already queued "
                f"(send_queue_limit); wait for the connection or raise the limit"
            )
        self._queue.append(text)
        return []

    def close(self, code: int = NORMAL, reason: str = "", *, now: float) -> list[ClientAction]:
        """Close for good: no reconnect follows. Idempotent.

        When open, our Close is queued and the connection ends when the server's Close comes
        back (RFC 6455 §7.1.1), or ``close_timeout`` later; ``Closed(final=True)`` says when.
        """
        validate_close_code(code)
        now = self._advance(now)
        if self.state in (ClientState.CLOSED, ClientState.CLOSING):
            return []
        self._queue.clear()
        self._close_code, self._close_reason = code, reason
        if self.state is ClientState.OPEN and self._ws is not None:
            self.state = ClientState.CLOSING
            self._deadline = now + self.config.close_timeout
            self._conns.write(self._ws.send(CloseConnection(code=code, reason=reason)))
            return []
        return self._conns.abort() + self._final(code, reason)

    def _final(self, code: int, reason: str) -> list[ClientAction]:
        self._ws = None
        self.state = ClientState.CLOSED
        self._deadline = None
        return [Closed(code=code, reason=reason, final=True)]

    # -------------------------------------------------------------- transport events

    def receive(self, event: ClientEvent) -> list[ClientAction]:
        """A transport event; one about a connection other than the current one is ignored."""
        if type(event) is BytesReceived:
            if event.conn_id != self._conns.current:
                return []
            return self._data_received(event.data, self._advance(event.now))
        if type(event) is TransportClosed:
            if not self._conns.forget(event.conn_id):
                return []
            return self._transport_lost(self._advance(event.now), event.error)
        if type(event) is ConnectionOpened:
            if event.conn_id != self._conns.current or self.state is not ClientState.CONNECTING:
                return []  # a late answer to an attempt we gave up on
            return self._transport_opened(self._advance(event.now))
        raise LocalProtocolError(f"TankClient.receive takes a transport event, got {event!r}")

    def _transport_opened(self, now: float) -> list[ClientAction]:
        """TCP is up: queue the upgrade request."""
        self._conns.opened()
        ws = WSConnection(ConnectionType.CLIENT)
        self._ws = ws
        self.state = ClientState.HANDSHAKING
        self._deadline = now + self.config.connect_timeout
        config = self.config
        extensions: list[Extension] = []
        if config.compression:
            # The inflated size is bounded in bytes: at most 4 per character of the limit.
            limit = 4 * config.max_message_size
            threshold = config.compression_threshold
            extensions.append(DeflateExtension(max_message_size=limit, threshold=threshold))
        request = Request(
            host=self._host_header, target=self._target, extensions=extensions,
            subprotocols=[SUBPROTOCOL] if config.recover else [],
        )
        self._conns.write(ws.send(request))
        return []

    def _data_received(self, data: bytes, now: float) -> list[ClientAction]:
        ws = self._ws
        if ws is None or self.state not in (
            ClientState.HANDSHAKING,
            ClientState.OPEN,
            ClientState.CLOSING,
        ):
            return []
        self._last_seen = now
        if self.state is ClientState.CLOSING:
            return self._closing_data(ws, data, now)
        actions: list[ClientAction] = []
        try:
            ws.receive_data(data)
            self._events(ws, now, actions)
        except WsLocalProtocolError:
            return actions
        except WsRemoteProtocolError as exc:
            # A server that is not one (garbage HTTP, a wrong Sec-WebSocket-Accept): never raise.
            if self._ws is ws:
                actions += self._lost(f"bad upgrade response: {exc}", now, 1006)
        return actions

    def _events(self, ws: WSConnection, now: float, actions: list[ClientAction]) -> None:
        for event in ws.events():
            if self._ws is not ws:
                break
            match event:
                case AcceptConnection(subprotocol=subprotocol):
                    self._positions.recovering = subprotocol == SUBPROTOCOL
                    actions += self._opened(now)
                case RejectConnection(status_code=status):
                    reason = f"upgrade refused with HTTP {status} {_phrase(status)}".rstrip()
                    actions += self._lost(reason, now, 1006, http_status=status)
                case RejectData():
                    pass
                case TextMessage(data=text, message_finished=done):
                    actions += self._arrived(self._inbox.text(text, done, self._topics), now)
                case BytesMessage(data=raw, message_finished=done):
                    actions += self._arrived(self._inbox.binary(bytes(raw), done, self._topics), now)
                case Ping():
                    # RFC 6455 §5.5.2: "an endpoint MUST send a Pong frame in response" (bounded
                    # by §5.5.3 for a server that never reads: ClientConnections.answer_ping).
                    self._conns.answer_ping(ws.send(event.response()))
                case Pong(payload=payload):
                    if self._ping_payload is not None and bytes(payload) == self._ping_payload:
                        self.latency = now - self._ping_sent_at
                        self._ping_payload = None
                        actions.append(LatencyMeasured(rtt=self.latency))
                case CloseConnection(code=code, reason=reason):
                    actions += self._server_closed(ws, int(code), reason or "", now)
                case _:
                    pass

    def _closing_data(self, ws: WSConnection, data: bytes, now: float) -> list[ClientAction]:
        # After our Close only the server's Close matters (RFC 6455 §5.5.1: no more data).
        try:
            ws.receive_data(data)
        except WsLocalProtocolError:
            return []
        for event in ws.events():
            if isinstance(event, CloseConnection):
                self._conns.close_after_output(now + self.config.close_timeout)
                return self._final(self._close_code, self._close_reason)
        return []

    def _transport_lost(self, now: float, error: str | None) -> list[ClientAction]:
        """The current connection failed to open, or went away."""
        if self.state is ClientState.CLOSING:
            return self._final(self._close_code, self._close_reason)
        if self.state not in (ClientState.CONNECTING, ClientState.HANDSHAKING, ClientState.OPEN):
            return []
        return self._lost(error or _EOF, now, 1006)

    def tick(self, now: float) -> list[ClientAction]:
        """Service what is due: heartbeats, the liveness deadline, timeouts, the next attempt, and
        connections closed after their output that were never reported gone."""
        now = self._advance(now)
        actions: list[ClientAction] = []
        if self._conns.draining:
            actions += self._conns.expire(now)
        deadline = self._deadline
        if deadline is None or now < deadline:
            return actions
        match self.state:
            case ClientState.WAITING:
                actions += self._connect(now)
            case ClientState.CONNECTING | ClientState.HANDSHAKING:
                actions += self._retry_if_due(self._lost("connect timeout", now, 1006), now)
            case ClientState.OPEN:
                actions += self._retry_if_due(self._tick_open(now), now)
            case ClientState.CLOSING:
                # The server never answered our Close within close_timeout.
                actions += self._conns.abort() + self._final(self._close_code, self._close_reason)
            case _:
                self._deadline = None
        return actions

    # -------------------------------------------------------------- internals

    def _advance(self, now: float) -> float:
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _check_topic(self, topic: str) -> None:
        if not isinstance(topic, str):
            raise LocalProtocolError(f"a topic is a str, got {type(topic).__name__}")
        check_utf8(topic, "topic")

    def _check_not_closed(self, what: str) -> None:
        if self.state in (ClientState.CLOSED, ClientState.CLOSING):
            raise LocalProtocolError(f"{what}() on a closed client; create a new one")

    def _connect(self, now: float) -> list[ClientAction]:
        self.state = ClientState.CONNECTING
        self._ws = None
        self._deadline = now + self.config.connect_timeout
        conn_id = self._conns.new()
        return [OpenConnection(conn_id=conn_id, host=self._host, port=self._port, tls=self._secure)]

    def _opened(self, now: float) -> list[ClientAction]:
        self.state = ClientState.OPEN
        self._opens += 1
        attempt = self._backoff.opened(now)
        self._last_seen = now
        self._inbox.opened()
        # Exactly one sub: per held topic on every open, then what send() queued, in order.
        for topic in self._topics:
            self._text(self._positions.subscribe_text(topic))
        while self._queue:
            self._text(self._queue.popleft())
        if self.config.heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval
        self._schedule_open()
        return [Opened(reconnect=self._opens > 1, attempt=attempt)]

    def _schedule_open(self) -> None:
        if self.config.heartbeat:
            death = self._last_seen + self.config.heartbeat_timeout
            self._deadline = min(self._next_heartbeat, death)
        else:
            self._deadline = None

    def _retry_if_due(self, actions: list[ClientAction], now: float) -> list[ClientAction]:
        # A backoff delay of (almost) zero puts the next attempt at `now`: start it in this tick,
        # so that afterwards next_deadline() is None or later than now.
        if self.state is ClientState.WAITING and self._deadline is not None and self._deadline <= now:
            actions += self._connect(now)
        return actions

    def _tick_open(self, now: float) -> list[ClientAction]:
        silent_for = now - self._last_seen
        # Compare with the very sum the deadline was computed from: `now - last_seen` can round
        # below the timeout when `now == last_seen + timeout` exactly.
        if now >= self._last_seen + self.config.heartbeat_timeout:
            actions: list[ClientAction] = [HeartbeatTimedOut(silent_for=silent_for)]
            return actions + self._lost("heartbeat timeout", now, 1006)
        if now >= self._next_heartbeat:
            # None is queued while the adapter has taken nothing since the last control frame
            # (any take empties that lane): what waits proves us alive once taken, and a server
            # that pings and never reads cannot make our heartbeats pile up behind it.
            if not self._conns.control_backlog:
                self._text(_CLIENT_HEARTBEAT)
                self._ping_counter += 1
                payload = self._ping_counter.to_bytes(8, "big")
                self._ping_payload = payload
                self._ping_sent_at = now
                assert self._ws is not None
                self._conns.write(self._ws.send(Ping(payload=payload)), control=True)
            self._next_heartbeat += self.config.heartbeat_interval
            if self._next_heartbeat <= now:
                self._next_heartbeat = now + self.config.heartbeat_interval
        self._schedule_open()
        return []

    def _arrived(self, arrival: Arrival | None, now: float) -> list[ClientAction]:
        if self._inbox.too_big:
            return self._lost("message too big", now, 1009)
        if arrival is None:
            return []
        if type(arrival) is Welcomed:
            self.user_id = arrival.user_id
        elif type(arrival) is MessageArrived and self._positions.recovering:
            recovered = self._positions.arrived(arrival)
            if recovered is not None:
                return [recovered]
        return [arrival]

    def _server_closed(
        self, ws: WSConnection, code: int, reason: str, now: float
    ) -> list[ClientAction]:
        # RFC 6455 §5.5.1: answer the server's Close with a Close (same code; empty if none).
        echo = CloseReason.NO_STATUS_RCVD if code == CloseReason.NO_STATUS_RCVD else code
        with contextlib.suppress(WsLocalProtocolError):
            self._conns.write(ws.send(CloseConnection(code=echo)))
        return self._lost(reason or "closed by the server", now, code)

    def _lost(
        self, reason: str, now: float, code: int, *, http_status: int | None = None
    ) -> list[ClientAction]:
        """The current connection is over: drop it (abort it without a closing handshake, else
        close it once our last frames are taken), report it, then wait and retry (or stop)."""
        actions: list[ClientAction] = []
        if code == 1006:
            actions += self._conns.abort()
        else:
            self._conns.close_after_output(now + self.config.close_timeout)
        self._ws = None
        self._ping_payload = None
        if not self.config.reconnect:
            self.state = ClientState.CLOSED
            self._deadline = None
            actions.append(Closed(code=code, reason=reason, final=True, http_status=http_status))
            return actions
        actions.append(Closed(code=code, reason=reason, final=False, http_status=http_status))
        delay, attempt = self._backoff.failed(code, self._last_seen)
        self.state = ClientState.WAITING
        self._deadline = now + delay
        actions.append(Reconnecting(delay=delay, attempt=attempt))
        return actions


def _phrase(status: int) -> str:
    """The standard reason phrase of an HTTP status (wsproto does not pass the server's on)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
