"""``FakePeer``: a WebSocket client over a ``Harness`` connection, built on wsproto's client side."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
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

from ..actions import Action
from .harness import FakeTransport, Harness

__all__ = ["FakePeer", "basic_auth_header"]

class FakePeer:
    """A WebSocket client over a ``Harness`` connection, built on wsproto's client side."""

    def __init__(self, harness: Harness, *, peer_host: str = "127.0.0.1") -> None:
        self.harness = harness
        self.conn_id = harness.accept(peer_host)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.auto_pong = True
        #: Complete messages read so far (text as str, binary as bytes).
        self.messages: list[str | bytes] = []
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        self.close: CloseConnection | None = None
        self.rejected: RejectConnection | None = None
        self.accepted = False
        self.user_id = ""
        self._parts: list[str | bytes] = []

    @property
    def transport(self) -> FakeTransport:
        return self.harness.transports[self.conn_id]

    def handshake(
        self,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        extensions: Sequence[Extension] = (),
        subprotocols: Sequence[str] = (),
    ) -> None:
        """Send the upgrade request (offering wsproto's ``extensions`` and ``subprotocols``)
        and read the answer."""
        extra = [(k.encode(), v.encode()) for k, v in headers]
        request = Request(
            host="tank.test", target=target, extra_headers=extra, extensions=list(extensions),
            subprotocols=list(subprotocols),
        )
        self.send_raw(self.ws.send(request))
        self.read()
        if self.accepted and self.messages:
            hello = self.messages[0]
            if isinstance(hello, str) and hello.startswith("Hello, "):
                self.user_id = hello[len("Hello, ") : -len("! Welcome to WebSocket server.")]

    # sending -------------------------------------------------------------------

    def send_raw(self, data: bytes) -> list[Action]:
        return self.harness.feed(self.conn_id, data)

    def send_text(self, text: str) -> list[Action]:
        return self.send_raw(self.ws.send(Message(data=text)))

    def send_binary(self, data: bytes) -> list[Action]:
        return self.send_raw(self.ws.send(Message(data=data)))

    def send_ping(self, payload: bytes = b"") -> list[Action]:
        return self.send_raw(self.ws.send(Ping(payload=payload)))

    def send_close(self, code: int | None = 1000, reason: str = "") -> list[Action]:
        # wsproto only sends an empty Close for the enum member itself (wsproto #182).
        close_code = CloseReason.NO_STATUS_RCVD if code is None else code
        return self.send_raw(self.ws.send(CloseConnection(code=close_code, reason=reason or None)))

    def vanish(self, error: str | None = None) -> list[Action]:
        """The transport is gone without a closing handshake."""
        return self.harness.peer_closed(self.conn_id, error)

    # reading -------------------------------------------------------------------

    def read(self) -> list[Event]:
        """Read what the server wrote (flushing it); answer Pings unless ``auto_pong`` is off."""
        data = self.harness.flush(self.conn_id)
        if not data or self.close is not None:
            return []
        self.ws.receive_data(data)
        events: list[Event] = []
        # Handle each event as it comes: wsproto changes state while its generator is consumed,
        # so a Ping read before a Close is answered before the Close moves the state on.
        for event in self.ws.events():
            events.append(event)
            match event:
                case AcceptConnection():
                    self.accepted = True
                case RejectConnection() as rejected:
                    self.rejected = rejected
                case RejectData():
                    pass
                case TextMessage(data=text, message_finished=done):
                    self._collect(text, done)
                case BytesMessage(data=raw, message_finished=done):
                    self._collect(bytes(raw), done)
                case Ping(payload=payload):
                    self.pings.append(bytes(payload))
                    # wsproto refuses a Pong once we sent our Close (LOCAL_CLOSING).
                    if self.auto_pong and self.ws.state is ConnectionState.OPEN:
                        self.send_raw(self.ws.send(event.response()))
                case Pong(payload=payload):
                    self.pongs.append(bytes(payload))
                case CloseConnection() as close:
                    self.close = close
        return events

    def _collect(self, part: str | bytes, done: bool) -> None:
        self._parts.append(part)
        if done:
            first = self._parts[0]
            if isinstance(first, str):
                self.messages.append("".join(p for p in self._parts if isinstance(p, str)))
            else:
                self.messages.append(b"".join(p for p in self._parts if isinstance(p, bytes)))
            self._parts = []

    def take(self) -> list[str | bytes]:
        """Read, then return and forget every complete message read so far."""
        self.read()
        out, self.messages = self.messages, []
        return out


def basic_auth_header(user: str, password: str) -> tuple[str, str]:
    """An ``Authorization: Basic`` header (handy for authentication-hook tests)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("authorization", f"Basic {token}")
