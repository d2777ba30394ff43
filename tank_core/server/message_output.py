"""What to send on a connection whose transport frames WebSocket messages itself (ASGI).

Such a transport takes messages, not bytes: ``TankServer.messages_to_send(conn_id)`` gives it the
same output every socket gets, read back into what it can send: the answer to the opening
handshake (``AcceptWebSocket`` or an ``HttpAnswer``), text messages (``SendText``... as
``OutgoingText``), and the Close (``OutgoingClose``). Pings and Pongs are left out: such a
transport answers and sends its own. The core keeps writing frames (one shared ``bytes`` object
per fan-out), so reading them back is done once per shared object, not once per recipient.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AcceptWebSocket",
    "HttpAnswer",
    "Outgoing",
    "OutgoingClose",
    "OutgoingText",
    "OutputReader",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptWebSocket:
    """The upgrade was accepted: accept the WebSocket (ASGI ``websocket.accept``) with the
    subprotocol agreed, if any (the recovery extension's)."""

    subprotocol: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpAnswer:
    """An HTTP answer: to a request, or refusing an upgrade (401, 403, 503...)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingText:
    """One text message."""

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingClose:
    """Our Close: close the WebSocket with ``code`` (None: no code) and ``reason``."""

    code: int | None
    reason: str


Outgoing = AcceptWebSocket | HttpAnswer | OutgoingText | OutgoingClose

_ACCEPT = AcceptWebSocket()
#: Headers of our own answers that framing transports set themselves.
_HOP_BY_HOP = frozenset({b"connection", b"content-length", b"transfer-encoding", b"upgrade"})


def _http_answer(data: bytes) -> tuple[Outgoing, int]:
    """The answer at the start of ``data`` (our own serialization: a head, then
    ``content-length`` bytes of body) and where it ends."""
    end = data.index(b"\r\n\r\n")
    lines = data[:end].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: list[tuple[bytes, bytes]] = []
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            length = int(value)
        if name not in _HOP_BY_HOP:
            headers.append((name, value))
    body_start = end + 4
    if status == 101:
        chosen = [value for name, value in headers if name == b"sec-websocket-protocol"]
        if chosen:
            return AcceptWebSocket(subprotocol=chosen[0].decode("latin-1")), body_start
        return _ACCEPT, body_start
    stop = body_start + length
    return HttpAnswer(status=status, headers=tuple(headers), body=data[body_start:stop]), stop


def _frames(data: bytes, pos: int, out: list[Outgoing]) -> None:
    """Our own unmasked, unfragmented frames from ``pos`` on (``wire/frames.py``)."""
    size = len(data)
    while pos < size:
        first = data[pos]
        length = data[pos + 1] & 0x7F
        head = pos + 2
        if length == 126:
            length = int.from_bytes(data[head : head + 2], "big")
            head += 2
        elif length == 127:
            length = int.from_bytes(data[head : head + 8], "big")
            head += 8
        stop = head + length
        opcode = first & 0x0F
        if opcode == 0x1:
            out.append(OutgoingText(text=data[head:stop].decode("utf-8")))
        elif opcode == 0x8:
            payload = data[head:stop]
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            out.append(OutgoingClose(code=code, reason=payload[2:].decode("utf-8", "replace")))
        # 0x9 and 0xA (Ping, Pong): the transport keeps its own.
        pos = stop


class OutputReader:
    """Reads output back into messages, remembering recent shared chunks (a fan-out appends one
    ``bytes`` object to every recipient's lane: it is read once, however many take it)."""

    __slots__ = ("_held", "_recent")

    #: Chunks and bytes remembered at most (the chunks are kept alive while remembered).
    LIMIT = 256
    LIMIT_BYTES = 4 * 1_048_576

    def __init__(self) -> None:
        # id -> (the chunk itself, kept so that its id cannot be reused; what it reads as)
        self._recent: dict[int, tuple[bytes, tuple[Outgoing, ...]]] = {}
        self._held = 0

    def read(self, data: bytes, *, shared: bool = True) -> tuple[Outgoing, ...]:
        """The messages in ``data`` (an HTTP answer and whole frames, as the core writes them)."""
        if shared:
            known = self._recent.get(id(data))
            if known is not None and known[0] is data:
                return known[1]
        out: list[Outgoing] = []
        pos = 0
        if data.startswith(b"HTTP/1.1 "):
            answer, pos = _http_answer(data)
            out.append(answer)
        _frames(data, pos, out)
        read = tuple(out)
        if shared:
            if len(self._recent) >= self.LIMIT or self._held + len(data) > self.LIMIT_BYTES:
                self._recent.clear()
                self._held = 0
            self._recent[id(data)] = (data, read)
            self._held += len(data)
        return read
