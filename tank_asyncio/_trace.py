"""Debug tracing: one log line per frame in and out (``tank serve --log-level debug``).

Only used when the ``tank.frames`` logger is enabled for DEBUG when the server starts; otherwise the
adapter never calls into this module (one boolean test per dispatch and per read).

Outgoing frames are ours (unmasked, whole frames, or an HTTP answer); incoming ones are parsed from a
per-connection copy of the bytes, after the 101, by a tolerant scanner that never raises.
"""

from __future__ import annotations

import logging
import struct

from tank_core import (
    Action,
    SendBytes,
    SendBytesToEach,
    SendControl,
)

__all__ = ["FrameTracer", "describe_frames", "frame_logger"]

frame_logger = logging.getLogger("tank.frames")

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
    """Logs frames in and out for every connection of one server."""

    def __init__(self) -> None:
        self._incoming: dict[int, _Incoming] = {}

    def received(self, conn_id: int, data: bytes) -> None:
        state = self._incoming.get(conn_id)
        if state is None:
            state = self._incoming[conn_id] = _Incoming()
        mode = state.mode
        if mode == "off":
            return
        buf = state.buf
        if mode == "head" and not buf:
            first = data.split(b"\r\n", 1)[0][:200].decode("latin-1")
            frame_logger.debug("conn %d <- http %s", conn_id, first)
        buf += data
        if mode == "head":
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                del buf[: end + 4]  # what follows the head is frames, if the upgrade succeeds
                state.mode = "after"
        elif mode == "ws":
            lines, used = _parse(buf)
            del buf[:used]
            for line in lines:
                frame_logger.debug("conn %d <- %s", conn_id, line)
        if len(buf) > _MAX_BUFFER:
            state.mode = "off"
            state.buf = bytearray()

    def _answered(self, conn_id: int, upgraded: bool) -> None:
        state = self._incoming.get(conn_id)
        if state is None or state.mode == "off":
            return
        if upgraded:
            state.mode = "ws"
            pending, state.buf = bytes(state.buf), bytearray()
            if pending:
                self.received(conn_id, pending)
        else:
            state.mode = "head"
            state.buf = bytearray()

    def forget(self, conn_id: int) -> None:
        self._incoming.pop(conn_id, None)

    def sent(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is SendBytesToEach:
                ids = action.conn_ids
                who = "conns " + ",".join(map(str, ids)) if len(ids) <= 8 else f"{len(ids)} conns"
                for line in describe_frames(action.data):
                    frame_logger.debug("%s -> %s", who, line)
            elif type(action) is SendBytes or type(action) is SendControl:
                data = action.data
                for line in describe_frames(data):
                    frame_logger.debug("conn %d -> %s", action.conn_id, line)
                if type(action) is SendControl and data.startswith(b"HTTP/"):
                    self._answered(action.conn_id, data.startswith(b"HTTP/1.1 101 "))
