"""What one peer may take from the server: the limits of ``ServerConfig.limits``, validated once.

Each default is far above what a normal application needs and far below what hurts the process
(docs: "Limits"). ``None`` turns a limit off. What happens when one is met is the server's
business (``tank_core/server/pacing.py``): reading paused for a while, or a close with a code
that says why, and a counter in ``/metrics`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import positive, positive_int

__all__ = ["LIMIT_NAMES", "Limits"]

#: The names ``ServerStats.limit_hits`` counts under (``/metrics``: ``tank_limit_hits_total``):
#: the field that was met, ``input_rate`` for ``max_input_bytes_per_second``.
LIMIT_NAMES = (
    "input_budget",
    "input_rate",
    "max_frames_per_second",
    "max_connections",
    "max_connections_per_address",
    "max_topics_per_connection",
    "max_topic_length",
    "max_partial_bytes",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-connection and per-process limits of a server (``ServerConfig(limits=Limits(...))``)."""

    #: Bytes of one connection's input handled per loop turn, a frame counting as at least 64:
    #: past them its reading pauses, what was read beyond waits in the core, and the adapter's
    #: next turns (``end_turn``) go on with it.
    input_budget: int = 65_536
    #: Frames (messages, fragments, Pings, Pongs) per second from one connection, with bursts of
    #: twice as many; more closes it with 1008 ``rate limit exceeded``.
    max_frames_per_second: float | None = 1_000.0
    #: Bytes per second from one connection, with bursts of twice ``max_message_size``; more
    #: pauses its reading until it is back under the rate (nothing is closed or lost).
    max_input_bytes_per_second: float | None = 1_048_576.0
    #: Sockets open at once in this process; more are answered 503 and closed.
    max_connections: int | None = 100_000
    #: WebSocket connections from one client address (behind a trusted proxy, the address it
    #: forwards); more upgrades are answered 503.
    max_connections_per_address: int | None = 10_000
    #: Topics one connection may hold; one more ``sub:`` closes it with 1008 ``too many topics``.
    max_topics_per_connection: int | None = 1_000
    #: Bytes (UTF-8) of a topic name: a longer ``sub:`` closes with 1008, a publish gets 400.
    max_topic_length: int = 1_024
    #: Bytes of unfinished incoming messages held across all connections; the connection whose
    #: message would pass it is closed with 1013 ``try again later``.
    max_partial_bytes: int = 64 * 1_048_576
    #: Topics (those with the most subscribers) and RTT samples listed one by one in
    #: ``/api/stats`` and ``/metrics``; the totals always count them all.
    max_stats_entries: int = 1_000

    def __post_init__(self) -> None:
        for name in ("input_budget", "max_topic_length", "max_partial_bytes", "max_stats_entries"):
            positive_int(f"limits.{name}", getattr(self, name))
        for name in ("max_connections", "max_connections_per_address", "max_topics_per_connection"):
            value = getattr(self, name)
            if value is not None:  # None: no limit
                positive_int(f"limits.{name}", value)
        for name in ("max_frames_per_second", "max_input_bytes_per_second"):
            value = getattr(self, name)
            if value is not None:
                positive(f"limits.{name}", value)
