"""One socket's protocol state: h11 until the upgrade, then wsproto's frame layer.

A ``WireConnection`` only holds state and assembles messages; the server decides what to do with
them. The RFC's duties it helps with: counting each message's bytes (wsproto has no size limit,
PROTOCOL.md: 1009 past ``max_message_size``), checking that a binary message is UTF-8 (PROTOCOL.md
[fix]: dropped when it is not), and answering Pings without waiting for the application.
"""

from __future__ import annotations

import enum

import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.extensions import Extension

from .deflate import DeflateExtension
from .fastpath import RegisteredCloseCodes

__all__ = ["MessageAssembler", "WireConnection", "WireState"]

#: Control-lane bytes (Pongs, Pings) a peer may leave untaken before we stop adding to them.
#: RFC 6455 §5.5.3 lets an endpoint answer only the most recent Ping.
MAX_CONTROL_BACKLOG = 65536


class WireState(enum.Enum):
    #: Reading an HTTP request (upgrade or API call).
    HTTP = "http"
    #: Waiting for the application's verdict on an upgrade; reading is paused.
    AUTHORIZING = "authorizing"
    #: Upgraded: frames flow through wsproto and messages through the engine.
    WEBSOCKET = "websocket"
    #: We asked the adapter to close the socket once written; it has ``close_timeout`` to report
    #: it gone before we ask for an abort (a peer that stops reading cannot hold it forever).
    CLOSED = "closed"


class MessageAssembler:
    """Collects the fragments of one incoming data message and counts its bytes."""

    __slots__ = ("binary", "limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.binary = False

    def add(self, chunk: bytes, *, binary: bool) -> bool:
        """Append a fragment; False when the message has grown past the limit."""
        if not self.parts:
            self.binary = binary
        self.size += len(chunk)
        if self.size > self.limit:
            return False
        if chunk:
            self.parts.append(chunk)
        return True

    def finish(self) -> bytes | None:
        """The whole message; None for a binary message that is not valid UTF-8."""
        parts = self.parts
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        binary = self.binary
        self.parts = []
        self.size = 0
        self.binary = False
        if binary:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return payload


class WireConnection:
    __slots__ = (
        "assembler",
        "backlog",
        "byte_tokens",
        "client_host",
        "close_codes",
        "conn_id",
        "deflate",
        "frame_tokens",
        "held",
        "http",
        "message_level",
        "paused",
        "peer_host",
        "recovery",
        "request",
        "request_body",
        "state",
        "tokens_at",
        "turn_bytes",
        "user_id",
        "ws",
    )

    def __init__(
        self, conn_id: int, peer_host: str, max_message_size: int, *, message_level: bool = False
    ) -> None:
        self.conn_id = conn_id
        #: Its transport frames WebSocket messages itself (ASGI): after the upgrade, messages
        #: arrive whole (``MessageArrived``) and output is taken as messages.
        self.message_level = message_level
        #: Agreed the recovery extension: ``recover:`` is a command, not a relay.
        self.recovery = False
        self.peer_host = peer_host
        #: The client's address: ``peer_host``, or what a trusted proxy forwarded.
        self.client_host = peer_host
        # The server's pacing of this socket's input (tank_core/server/pacing.py).
        #: Why reading is paused: a set of PAUSE_* bits; 0 while reading.
        self.paused = 0
        #: Input bytes handled since this socket last yielded its loop turn.
        self.turn_bytes = 0
        #: Token buckets for the input byte rate and the frame rate, last refilled at ``tokens_at``.
        self.byte_tokens = -1.0
        self.frame_tokens = -1.0
        self.tokens_at = 0.0
        #: Bytes of an unfinished incoming message counted in the process-wide total.
        self.held = 0
        #: Input received past this turn's budget, handled in the next turns (``end_turn``).
        self.backlog = b""
        self.state = WireState.HTTP
        self.http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=16384
        )
        self.request: h11.Request | None = None
        self.request_body = bytearray()
        self.ws: WsConnection | None = None
        #: permessage-deflate, when agreed (``deflate.py``).
        self.deflate: DeflateExtension | None = None
        #: Registered close codes wsproto does not know (``fastpath.py``).
        self.close_codes: RegisteredCloseCodes | None = None
        self.assembler = MessageAssembler(max_message_size)
        self.user_id = ""

    @property
    def live(self) -> bool:
        """Not yet released (a property, so that type checkers do not narrow it away)."""
        return self.state is not WireState.CLOSED

    def http_conn(self) -> h11.Connection:
        """The HTTP/1.1 state machine; only exists before the upgrade."""
        assert self.http is not None, "no HTTP state after the upgrade"
        return self.http

    def release(self) -> None:
        """Forget all protocol state: the socket is only waiting to be closed."""
        self.state = WireState.CLOSED
        self.http = None
        self.ws = None
        self.request = None
        self.request_body = bytearray()
        self.backlog = b""

    def start_websocket(self, deflate: DeflateExtension | None = None) -> WsConnection:
        """Hand the socket to wsproto's frame layer, with permessage-deflate if agreed."""
        codes = RegisteredCloseCodes()
        extensions: list[Extension] = [codes] if deflate is None else [deflate, codes]
        ws = WsConnection(ConnectionType.SERVER, extensions=extensions)
        self.deflate = deflate
        self.close_codes = codes
        self.ws = ws
        self.state = WireState.WEBSOCKET
        # An idle connection should cost little memory: HTTP state is not needed any more.
        self.http = None
        self.request = None
        self.request_body = bytearray()
        return ws
