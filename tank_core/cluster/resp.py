"""RESP2, the Redis protocol, for the broker link: commands encoded here, replies parsed by hiredis.

``hiredis.Reader`` is sans-IO: ``feed()`` bytes, then ``gets()`` returns ``False`` until a reply is
complete. Error replies come back as values (``RespError``), never raised; bytes that are not RESP
raise ``RespProtocolError``, which the link answers with a reconnect (DESIGN.md §4: Redis is a peer,
and a peer's garbage never makes the core raise). hiredis is the ``redis`` extra of the package: it is
imported when the first link is built, with a clear error when it is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

__all__ = [
    "Reply",
    "RespError",
    "RespParser",
    "RespProtocolError",
    "encode_command",
    "encode_publish",
    "require_hiredis",
]


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``), handed back as a value."""


class RespProtocolError(Exception):
    """The bytes from Redis are not RESP: the connection is beyond repair. ``replies`` holds the
    replies completed before the garbage, in order."""

    def __init__(self, message: str, replies: list[Any] | None = None) -> None:
        super().__init__(message)
        self.replies: list[Any] = replies if replies is not None else []


#: A parsed reply: bytes (bulk and simple strings), int, None (nil), RespError, or a list of them.
Reply = Any


def require_hiredis() -> Any:
    """The ``hiredis`` module, or ``ConfigError`` naming the extra to install."""
    try:
        return importlib.import_module("hiredis")
    except ImportError:
        raise ConfigError(
            "the Redis broker needs hiredis: pip install 'tank-python[redis]'"
        ) from None


def encode_command(args: Sequence[bytes]) -> bytes:
    """One command as a RESP array of bulk strings (binary-safe: any bytes in any argument)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_publish(channel: bytes, message: bytes) -> bytes:
    """``PUBLISH channel message``, the hot path of the publishing connection."""
    return b"".join(
        (
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n" % len(channel),
            channel,
            b"\r\n$%d\r\n" % len(message),
            message,
            b"\r\n",
        )
    )


class RespParser:
    """Replies from one connection, in order. Make a new one for each connection."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        hiredis = require_hiredis()
        self._reader = hiredis.Reader(protocolError=RespProtocolError, replyError=RespError)

    def feed(self, data: bytes) -> list[Reply]:
        """Every reply completed by ``data``; raises ``RespProtocolError`` on garbage."""
        reader = self._reader
        reader.feed(data)
        replies: list[Reply] = []
        try:
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        except Exception as exc:  # ours (protocolError=) or, for odd input, one of hiredis's
            raise RespProtocolError(str(exc) or type(exc).__name__, replies) from None
        return replies
