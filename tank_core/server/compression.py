"""Which connections get compressed frames, and those frames, made once per window size.

A connection that agreed permessage-deflate (``wire/deflate_offer.py``) is listed here with the
window size of what we send it. A fan-out compresses its messages once per window size among its
recipients (nearly always one: 15 bits) and shares the result, as it shares the plain frame with
everyone else. Messages shorter than ``threshold`` bytes, and those that would not shrink, go plain
(RSV1 clear), which RFC 7692 §6 allows message by message.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..wire.deflate import MessageDeflater
from ..wire.frames import compressed_text_frame, text_frame

__all__ = ["Compression"]


class Compression:
    """The compressing connections of one server, and a compressor per window size."""

    __slots__ = (
        "_deflaters", "_windows", "by_conn", "bytes_saved", "messages_compressed", "threshold"
    )

    def __init__(self, threshold: int) -> None:
        #: conn_id -> window bits of what we send it.
        self.by_conn: dict[int, int] = {}
        self.threshold = threshold
        self._deflaters: dict[int, MessageDeflater] = {}
        #: Window size -> how many connections use it (nearly always one size: 15 bits).
        self._windows: dict[int, int] = {}
        #: Messages compressed (once per window size, not per recipient).
        self.messages_compressed = 0
        #: Bytes not written thanks to compression, over all recipients.
        self.bytes_saved = 0

    def add(self, conn_id: int, window: int) -> None:
        self.by_conn[conn_id] = window
        self._windows[window] = self._windows.get(window, 0) + 1

    def discard(self, conn_id: int) -> None:
        window = self.by_conn.pop(conn_id, None)
        if window is not None:
            left = self._windows[window] - 1
            if left:
                self._windows[window] = left
            else:
                del self._windows[window]

    def split(self, conn_ids: Sequence[int]) -> tuple[list[int], dict[int, list[int]]]:
        """The recipients that get plain frames, and the others by window size."""
        by_conn = self.by_conn
        if len(self._windows) == 1:
            # One window size among all compressing connections: two passes in C.
            (only,) = self._windows
            zipped = [c for c in conn_ids if c in by_conn]
            plain = [c for c in conn_ids if c not in by_conn] if len(zipped) < len(conn_ids) else []
            return plain, {only: zipped} if zipped else {}
        plain = []
        groups: dict[int, list[int]] = {}
        for conn_id in conn_ids:
            window = by_conn.get(conn_id)
            if window is None:
                plain.append(conn_id)
            else:
                group = groups.get(window)
                if group is None:
                    groups[window] = [conn_id]
                else:
                    group.append(conn_id)
        return plain, groups

    def frames(self, payloads: Sequence[bytes], window: int) -> tuple[bytes, ...] | None:
        """The frames of ``payloads`` for connections with ``window``: each compressed when that
        pays; None when none of them is (the plain frames serve)."""
        threshold = self.threshold
        deflater: MessageDeflater | None = None
        frames: list[bytes] = []
        compressed = 0
        for payload in payloads:
            data = None
            if len(payload) >= threshold:
                if deflater is None:
                    deflater = self._deflater(window)
                data = deflater.compress(payload)
            if data is None:
                frames.append(text_frame(payload))
            else:
                compressed += 1
                frames.append(compressed_text_frame(data))
        if not compressed:
            return None
        self.messages_compressed += compressed
        return tuple(frames)

    def _deflater(self, window: int) -> MessageDeflater:
        deflater = self._deflaters.get(window)
        if deflater is None:
            deflater = self._deflaters[window] = MessageDeflater(window)
        return deflater
