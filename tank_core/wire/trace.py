"""Frame tracing: one line of text per frame in and out (``tank serve --log-level debug``).

Pure: it returns the lines, or passes them to the ``emit`` function it was given (the adapters
give their logger's ``debug``, logger ``tank.frames``). ``TankServer(tracer=...)`` calls it for
what its sockets send and receive; adapters make one only when that logger is enabled for DEBUG, so
tracing costs nothing otherwise.

Outgoing frames are ours (unmasked, whole frames, or an HTTP answer); incoming ones are parsed from a
per-connection copy of the bytes, after the 101, by a tolerant scanner that never raises.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["FrameTracer", "describe_frames"]

_OPCODES = {0x0: "continuation", 0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping", 0xA: "pong"}
_PREVIEW = 120
#: Incoming bytes kept per connection while waiting for the rest of a frame; past it, stop tracing.
_MAX_BUFFER = 2 * 1024 * 1024 + 14


def _preview(payload: bytes) -> str:
    text = payload[:_PREVIEW].decode("utf-8", "replace")
    more = "..." if len(payload) > _PREVIEW else ""
    return f"{text!r}{more}"


def _describe(opcode: int, fin: bool, payload: bytes) -> str:
    name = _OPCODES.get(opcode, f"opcode-{opcode:#x}")
    suffix = "" if fin else " (fragment)"
    if opcode in (0x1, 0x0):
        return f"{name}{suffix} {_preview(payload)}"
    if opcode == 0x8:
        if len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
            return f"close {code} {_preview(payload[2:])}"
        return "close (no status)"
    return f"{name}{suffix} {len(payload)} bytes"


def _parse(buf: bytearray) -> tuple[list[str], int]:
    """Describe the complete frames at the start of ``buf``; returns (lines, bytes consumed)."""
    lines: list[str] = []
    pos = 0
    size = len(buf)
    while size - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if size - pos < 4:
                break
            length = struct.unpack_from("!H", buf, pos + 2)[0]
            head = 4
        elif length == 127:
            if size - pos < 10:
                break
            length = struct.unpack_from("!Q", buf, pos + 2)[0]
            head = 10
        masked = bool(b1 & 0x80)
        if masked:
            head += 4
        if size - pos < head + length:
            break
        payload = bytes(buf[pos + head : pos + head + length])
        if masked:
            key = buf[pos + head - 4 : pos + head]
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        lines.append(_describe(b0 & 0x0F, bool(b0 & 0x80), payload))
        pos += head + length
    return lines, pos


def describe_frames(data: bytes) -> list[str]:
    """One description per frame in ``data`` (our own output), or the HTTP status line."""
    if data.startswith(b"HTTP/"):
        return ["http " + data.split(b"\r\n", 1)[0].decode("latin-1")]
    lines, used = _parse(bytearray(data))
    if used < len(data):
        lines.append(f"{len(data) - used} more bytes")
    return lines


class _Incoming:
    __slots__ = ("buf", "mode")

    def __init__(self) -> None:
        #: "head" (reading an HTTP head), "after" (head read, no answer yet), "ws", "off".
        self.mode = "head"
        self.buf = bytearray()


class FrameTracer:
    """Describes frames in and out for every connection of one server, passing each line to
    ``emit`` (an adapter passes its logger's ``debug``)."""

    def __init__(self, emit: Callable[[str], object]) -> None:
        self._emit = emit
        self._incoming: dict[int, _Incoming] = {}

    def received(self, conn_id: int, data: bytes) -> None:
        """Trace what ``conn_id`` sent (complete frames only; the rest waits)."""
        for line in self.describe_received(conn_id, data):
            self._emit(line)

    def sent(self, conn_id: int, data: bytes) -> None:
        """Trace what is written to ``conn_id`` (HTTP answers and whole frames)."""
        for line in self.describe_sent(conn_id, data):
            self._emit(line)

    def describe_received(self, conn_id: int, data: bytes) -> list[str]:
        """Lines for what ``conn_id`` sent (complete frames only; the rest waits)."""
        out: list[str] = []
        state = self._incoming.get(conn_id)
        if state is None:
            state = self._incoming[conn_id] = _Incoming()
        mode = state.mode
        if mode == "off":
            return out
        buf = state.buf
        if mode == "head" and not buf:
            first = data.split(b"\r\n", 1)[0][:200].decode("latin-1")
            out.append(f"conn {conn_id} <- http {first}")
        buf += data
        if mode == "head":
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                del buf[: end + 4]  # what follows the head is frames, if the upgrade succeeds
                state.mode = "after"
        elif mode == "ws":
            lines, used = _parse(buf)
            del buf[:used]
            out.extend(f"conn {conn_id} <- {line}" for line in lines)
        if len(buf) > _MAX_BUFFER:
            state.mode = "off"
            state.buf = bytearray()
        return out

    def _answered(self, conn_id: int, upgraded: bool) -> list[str]:
        state = self._incoming.get(conn_id)
        if state is None or state.mode == "off":
            return []
        if upgraded:
            state.mode = "ws"
            pending, state.buf = bytes(state.buf), bytearray()
            if pending:
                return self.describe_received(conn_id, pending)
        else:
            state.mode = "head"
            state.buf = bytearray()
        return []

    def forget(self, conn_id: int) -> None:
        self._incoming.pop(conn_id, None)

    def describe_sent(self, conn_id: int, data: bytes) -> list[str]:
        """Lines for what is written to ``conn_id``: HTTP answers (status line), then frames."""
        out: list[str] = []
        while data.startswith(b"HTTP/"):
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            head = data[:end]
            out.append(f"conn {conn_id} -> http " + head.split(b"\r\n", 1)[0].decode("latin-1"))
            out += self._answered(conn_id, head.startswith(b"HTTP/1.1 101 "))
            data = data[end + 4 + _content_length(head) :]
        if data:
            out.extend(f"conn {conn_id} -> {line}" for line in describe_frames(data))
        return out


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return 0
    return 0
