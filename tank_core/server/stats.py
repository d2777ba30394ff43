"""The counters behind ``/api/stats`` and ``/metrics``: a frozen snapshot, taken on request."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServerStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerStats:
    """A point-in-time copy of the server's counters (monotonic counters since start)."""

    #: Open WebSocket connections (closing ones excluded).
    connections: int
    #: Topic name -> number of subscribed connections; a topic without subscribers is absent.
    topics: dict[str, int] = field(default_factory=dict)
    #: Data messages received from clients (all kinds: sub, unsub, heartbeat, relay).
    messages_in: int = 0
    #: Data messages queued to clients (each delivery of a fan-out counts once).
    messages_out: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    heartbeat_timeouts: int = 0
    slow_consumer_closes: int = 0
    #: Connections accepted (WebSocket upgrades completed) since start.
    connections_total: int = 0
    #: Binary messages dropped because they were not valid UTF-8.
    messages_dropped: int = 0
    #: Bytes queued on data lanes and not yet reported flushed, over all connections.
    outbox_bytes: int = 0
    #: Latest heartbeat round-trip time per connection id, in seconds (connections with a sample).
    rtt: dict[int, float] = field(default_factory=dict)
    #: HTTP API requests answered.
    http_requests: int = 0
    #: Limit name -> times it was met (``tank_core.Limits``): a connection paused, refused or
    #: closed because of it.
    limit_hits: dict[str, int] = field(default_factory=dict)
    #: Bytes of unfinished incoming messages held now, over all connections.
    partial_bytes: int = 0
    #: Connections that agreed permessage-deflate and are not gone yet.
    compressed_connections: int = 0
    #: Messages compressed: once per window size per fan-out, whatever the number of recipients.
    messages_compressed: int = 0
    #: Bytes not written thanks to compression, over all recipients.
    compression_bytes_saved: int = 0
    #: Topics whose history offsets are remembered, and the publications kept for them
    #: (``ServerConfig.history``; 0 without).
    history_topics: int = 0
    history_publications: int = 0
    #: True once shutdown has begun.
    shutting_down: bool = False
    # The broker link (docs/scale-out.md); ``broker_up`` is None when this node has no broker.
    #: True while Redis is reachable and every channel subscribed; None without a broker.
    broker_up: bool | None = None
    #: Times the link came back up after going down.
    broker_reconnects: int = 0
    #: Gaps seen in other nodes' sequence numbers (``broker_missed`` messages in all).
    broker_gaps: int = 0
    broker_missed: int = 0
    #: Messages for other nodes waiting in the outage buffer now.
    broker_buffered: int = 0
    #: Messages for other nodes dropped (outage buffer full, or refused by Redis).
    broker_dropped: int = 0
    #: Messages from other nodes dropped as already delivered (re-sent after a reconnect).
    broker_duplicates: int = 0
    #: PUBLISH commands Redis acknowledged.
    broker_published: int = 0
    #: Messages from other nodes delivered to this node's connections.
    broker_received: int = 0
    #: Nodes Redis counted on ``{prefix}:all`` last time (this one included; 0 when unknown), and
    #: how many the link expects (fewer counted: publishes are answered ``"partial"``).
    broker_nodes: int = 0
    broker_nodes_expected: int = 0
