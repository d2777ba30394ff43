"""What nodes publish to each other through Redis: channel names and the envelope around a message.

Channels (DESIGN.md §5): ``{prefix}:t:{topic}`` per topic, ``{prefix}:u:{user_id}`` per user id,
``{prefix}:all`` for broadcasts and relays. Redis channel names are binary-safe, so a topic goes in
as its UTF-8 bytes, unescaped (``:``, spaces and the empty topic included).

The envelope is one ASCII header line, then the message exactly as the receivers' clients get it
(rendered once by the origin, framed once by each receiver)::

    1 p 5f0c9a1e3b7d2c44 42 -\\n{"topic":"news","data":"hello"}

version ``1``; kind (``p`` publish, ``b`` broadcast, ``r`` relay, ``s`` send to a user, ``d``
disconnect a user, ``l`` a node leaving the cluster); origin node id; the origin's sequence number
on this channel (1, 2, ...: a skip is a gap, a repeat a duplicate); the excluded connection of the
origin (a relay's sender) or ``-``.
Anything else (another version, a bad field) decodes to None and is dropped and counted.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "BROADCAST",
    "DISCONNECT",
    "KINDS",
    "LEAVE",
    "PUBLISH",
    "RELAY",
    "SEND",
    "VERSION",
    "Channels",
    "Envelope",
    "decode_envelope",
    "encode_envelope",
]

VERSION = b"1"
PUBLISH = b"p"
BROADCAST = b"b"
RELAY = b"r"
SEND = b"s"
DISCONNECT = b"d"
LEAVE = b"l"
KINDS = frozenset((PUBLISH, BROADCAST, RELAY, SEND, DISCONNECT, LEAVE))


class Envelope(NamedTuple):
    kind: bytes
    origin: bytes
    seq: int
    exclude: int | None
    payload: bytes


def encode_envelope(
    kind: bytes, origin: bytes, seq: int, exclude: int | None, payload: bytes
) -> bytes:
    """The envelope's bytes; ``origin`` is ASCII without spaces (a node id)."""
    excluded = b"-" if exclude is None else b"%d" % exclude
    return b"%s %s %s %d %s\n%s" % (VERSION, kind, origin, seq, excluded, payload)


def decode_envelope(data: bytes) -> Envelope | None:
    """The envelope in ``data``, or None when it is not one of ours (never raises)."""
    end = data.find(b"\n")
    if end < 0:
        return None
    fields = data[:end].split(b" ")
    if len(fields) != 5:
        return None
    version, kind, origin, seq, exclude = fields
    if version != VERSION or kind not in KINDS or not origin or not seq.isdigit():
        return None
    if exclude == b"-":
        excluded = None
    elif exclude.isdigit():
        excluded = int(exclude)
    else:
        return None
    return Envelope(kind, origin, int(seq), excluded, data[end + 1 :])


class Channels:
    """Channel names under one prefix."""

    __slots__ = ("all", "prefix", "topic_prefix", "user_prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        raw = prefix.encode("utf-8", "surrogatepass")
        self.topic_prefix = raw + b":t:"
        self.user_prefix = raw + b":u:"
        self.all = raw + b":all"

    def topic(self, topic: str) -> bytes:
        # Topics from the HTTP API may hold lone surrogates (JSON "\ud800"): keep them reversible.
        return self.topic_prefix + topic.encode("utf-8", "surrogatepass")

    def user(self, user_id: str) -> bytes:
        return self.user_prefix + user_id.encode("utf-8", "surrogatepass")
