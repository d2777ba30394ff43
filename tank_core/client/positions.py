"""Where the client stands in each topic's history, for the recovery extension (issue 11).

With a server that agreed ``tank.recovery.v1`` (``wire/recovery.py``), each publication carries its
offset and epoch: the client remembers the last one per topic and, on every open, subscribes with
``recover:`` from there instead of ``sub:``. The server replays what was missed, then says whether
that was all of it (``Recovered``). A topic never heard from yet is subscribed with
``recover:{"topic":T}``, which tells where it stands. Without the extension, ``sub:`` as before.
"""

from __future__ import annotations

import json

from ..wire.codec import reject_json_constant
from ..wire.recovery import RECOVER_PREFIX
from .notifications import MessageArrived, Recovered

__all__ = ["Positions"]

_RECOVERED = '{"type":"recovered"'


class Positions:
    """The (epoch, offset) reached in each topic, kept across reconnects."""

    __slots__ = ("_at", "recovering")

    def __init__(self) -> None:
        self._at: dict[str, tuple[str, int]] = {}
        #: The current connection agreed the extension.
        self.recovering = False

    def subscribe_text(self, topic: str) -> str:
        """What subscribes to ``topic`` on this connection."""
        if not self.recovering:
            return "sub:" + topic
        at = self._at.get(topic)
        command: dict[str, object] = {"topic": topic}
        if at is not None:
            command["epoch"], command["offset"] = at
        return RECOVER_PREFIX.decode() + json.dumps(command, separators=(",", ":"))

    def forget(self, topic: str) -> None:
        """Unsubscribed: a later subscription starts afresh."""
        self._at.pop(topic, None)

    def arrived(self, message: MessageArrived) -> Recovered | None:
        """Note where ``message`` stands; a ``recovered`` message becomes a ``Recovered``."""
        text = message.text
        if text.startswith(_RECOVERED):
            value = _object(text)
            if value is None:
                return None
            topic, epoch, offset = value.get("topic"), value.get("epoch"), value.get("offset")
            if isinstance(topic, str) and isinstance(epoch, str) and type(offset) is int:
                self._at[topic] = (epoch, offset)
                return Recovered(topic=topic, complete=value.get("complete") is True)
            return None
        topic = message.topic
        if topic is not None and '"offset":' in text:
            value = _object(text)
            if value is not None:
                epoch, offset = value.get("epoch"), value.get("offset")
                if isinstance(epoch, str) and type(offset) is int:
                    self._at[topic] = (epoch, offset)
        return None


def _object(text: str) -> dict[str, object] | None:
    try:
        value = json.loads(text, parse_constant=reject_json_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
