"""What one connection's data frames become: whole messages, then notifications.

Fragments are joined into one message of at most ``max_message_size`` characters (PROTOCOL.md:
larger drops the connection with 1009); the first message of each connection may be the server's
Hello naming our id; the text ``heartbeat`` is the server's heartbeat; anything else is a message,
a topic message when ``topic_of`` says so. Nothing a server sends is held beyond that limit, binary
messages included (their bytes are counted as they arrive, not only once they are whole).
"""

from __future__ import annotations

from ..wire.codec import HELLO_SUFFIX, TEXT_HEARTBEAT
from .notifications import HeartbeatReceived, MessageArrived, Welcomed, topic_of

__all__ = ["Inbox"]

_HEARTBEAT = TEXT_HEARTBEAT.decode()
_HELLO = "Hello, "
#: The most bytes one character takes in UTF-8 (RFC 3629 §3).
_UTF8_MAX = 4

Arrival = Welcomed | MessageArrived | HeartbeatReceived


class Inbox:
    """The message being received on the current connection, and whether it is too big."""

    __slots__ = ("_binary", "_binary_size", "_expect_hello", "_parts", "_size", "max_size", "too_big")

    def __init__(self, max_size: int) -> None:
        #: Largest message accepted, in characters (``ClientConfig.max_message_size``).
        self.max_size = max_size
        self._parts: list[str] = []
        self._size = 0
        self._binary: list[bytes] = []
        self._binary_size = 0
        self._expect_hello = True
        #: Set once a message passed ``max_size``: the connection is to be dropped with 1009.
        self.too_big = False

    def opened(self) -> None:
        """A new connection: nothing pending, and its first message may be the Hello."""
        self._parts = []
        self._size = 0
        self._binary = []
        self._binary_size = 0
        self._expect_hello = True
        self.too_big = False

    def binary(self, raw: bytes, done: bool, held: dict[str, None]) -> Arrival | None:
        """A chunk of a binary message: what it completes, if anything."""
        # PROTOCOL.md: the server never sends binary. Decode the whole message once (a chunk may
        # end mid-character); one that is not UTF-8 is dropped. Past 4 bytes per character allowed
        # it cannot decode to max_size characters: too big already, held no longer.
        self._binary.append(raw)
        self._binary_size += len(raw)
        if self._binary_size > _UTF8_MAX * self.max_size:
            self.too_big = True
            return None
        if not done:
            return None
        whole = b"".join(self._binary)
        self._binary = []
        self._binary_size = 0
        try:
            text = whole.decode()
        except UnicodeDecodeError:
            return None
        return self.text(text, True, held)

    def text(self, text: str, done: bool, held: dict[str, None]) -> Arrival | None:
        """A chunk of a text message: what it completes, if anything."""
        self._parts.append(text)
        self._size += len(text)
        if self._size > self.max_size:
            self.too_big = True
            return None
        if not done:
            return None
        whole = "".join(self._parts)
        self._parts = []
        self._size = 0
        if whole == _HEARTBEAT:
            return HeartbeatReceived()
        if self._expect_hello:
            # PROTOCOL.md [ref]: the first frame of every connection names our id (a new one on
            # each reconnect when we brought none).
            self._expect_hello = False
            if whole.startswith(_HELLO) and whole.endswith(HELLO_SUFFIX):
                return Welcomed(user_id=whole[len(_HELLO) : -len(HELLO_SUFFIX)])
        topic, data = topic_of(whole, held)
        return MessageArrived(text=whole, topic=topic, data=data)
