"""The answers of ``/api/stats`` (JSON) and ``/metrics`` (Prometheus text exposition 0.0.4).

PROTOCOL.md, "Server HTTP API": both report the same counters (``ServerStats``); at most
``limits.max_stats_entries`` topics and RTT samples are listed, the largest first.
"""

from __future__ import annotations

import math

from ..limits import LIMIT_NAMES
from .history_store import HistoryRead
from .http_api import HttpResponse, encode_body, json_response
from .stats import ServerStats

__all__ = [
    "METRICS_CONTENT_TYPE",
    "history_response",
    "metrics_response",
    "presence_response",
    "stats_response",
]

#: Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _largest_topics(stats: ServerStats, most: int) -> list[tuple[str, int]]:
    """The ``most`` topics with the most subscribers (then by name), sorted by name."""
    topics = stats.topics.items()
    if len(topics) > most:
        topics = sorted(topics, key=lambda item: (-item[1], item[0]))[:most]  # type: ignore[assignment]
    return sorted(topics)


def _some_rtts(stats: ServerStats, most: int) -> list[tuple[int, float]]:
    return sorted(stats.rtt.items())[:most]


def stats_response(stats: ServerStats, most: int = 1_000) -> HttpResponse:
    """``200`` with every ``ServerStats`` field; ``rtt`` keys (connection ids) become strings.
    At most ``most`` topics (the largest) and RTT samples are listed (``limits.max_stats_entries``);
    ``topics_total`` counts them all."""
    return json_response(
        200,
        {
            "connections": stats.connections,
            "topics": dict(_largest_topics(stats, most)),
            "topics_total": len(stats.topics),
            "messages_in": stats.messages_in,
            "messages_out": stats.messages_out,
            "pings_sent": stats.pings_sent,
            "pongs_received": stats.pongs_received,
            "heartbeat_timeouts": stats.heartbeat_timeouts,
            "slow_consumer_closes": stats.slow_consumer_closes,
            "connections_total": stats.connections_total,
            "messages_dropped": stats.messages_dropped,
            "outbox_bytes": stats.outbox_bytes,
            "rtt": {str(cid): _finite_or_none(rtt) for cid, rtt in _some_rtts(stats, most)},
            "http_requests": stats.http_requests,
            "limit_hits": dict(sorted(stats.limit_hits.items())),
            "partial_bytes": stats.partial_bytes,
            "compressed_connections": stats.compressed_connections,
            "messages_compressed": stats.messages_compressed,
            "compression_bytes_saved": stats.compression_bytes_saved,
            "history_topics": stats.history_topics,
            "history_publications": stats.history_publications,
            "shutting_down": stats.shutting_down,
            **_broker_fields(stats),
        },
    )


def _broker_fields(stats: ServerStats) -> dict[str, object]:
    if stats.broker_up is None:
        return {}  # a single process: no broker fields at all
    return {
        "broker_up": stats.broker_up,
        "broker_reconnects": stats.broker_reconnects,
        "broker_gaps": stats.broker_gaps,
        "broker_missed": stats.broker_missed,
        "broker_buffered": stats.broker_buffered,
        "broker_dropped": stats.broker_dropped,
        "broker_duplicates": stats.broker_duplicates,
        "broker_published": stats.broker_published,
        "broker_received": stats.broker_received,
        "broker_nodes": stats.broker_nodes,
        "broker_nodes_expected": stats.broker_nodes_expected,
    }


# --- Prometheus text exposition ----------------------------------------------------------------


def _escape_label_value(value: str) -> str:
    # Exposition format 0.0.4: in label values, backslash, double quote and line feed are escaped.
    # A lone surrogate has no UTF-8 form: spell it as a ``\ud800``-style escape first, so that
    # its backslash is escaped too.
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Exposition:
    """Accumulates metric families: ``# HELP``, ``# TYPE``, then samples."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: tuple[tuple[str, str], ...] = ()) -> None:
        if labels:
            inner = ",".join(f'{key}="{_escape_label_value(val)}"' for key, val in labels)
            self._lines.append(f"{name}{{{inner}}} {_format_value(value)}")
        else:
            self._lines.append(f"{name} {_format_value(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def metrics_response(stats: ServerStats, most: int = 1_000) -> HttpResponse:
    """``200`` with the counters in the Prometheus text exposition format 0.0.4."""
    out = _Exposition()
    out.single("tank_connections", "gauge", "Open WebSocket connections.", stats.connections)
    out.single("tank_topics", "gauge", "Topics with at least one subscriber.", len(stats.topics))
    out.family("tank_topic_subscribers", "gauge", "Subscribed connections per topic.")
    for topic, count in _largest_topics(stats, most):
        out.sample("tank_topic_subscribers", count, (("topic", topic),))
    out.single(
        "tank_outbox_bytes",
        "gauge",
        "Bytes queued to clients and not yet flushed.",
        stats.outbox_bytes,
    )
    counters = (
        ("tank_messages_in_total", "Data messages received from clients.", stats.messages_in),
        ("tank_messages_out_total", "Data messages queued to clients.", stats.messages_out),
        ("tank_pings_sent_total", "WebSocket Pings sent.", stats.pings_sent),
        ("tank_pongs_received_total", "WebSocket Pongs received.", stats.pongs_received),
        (
            "tank_heartbeat_timeouts_total",
            "Connections closed with 1011 for silence.",
            stats.heartbeat_timeouts,
        ),
        (
            "tank_slow_consumer_closes_total",
            "Connections closed with 1008 as slow consumers.",
            stats.slow_consumer_closes,
        ),
        (
            "tank_connections_accepted_total",
            "WebSocket upgrades completed.",
            stats.connections_total,
        ),
        (
            "tank_messages_dropped_total",
            "Binary messages dropped because they were not valid UTF-8.",
            stats.messages_dropped,
        ),
        ("tank_http_requests_total", "HTTP API requests answered.", stats.http_requests),
    )
    for metric, help_text, value in counters:
        out.single(metric, "counter", help_text, value)
    rtts = [rtt for rtt in stats.rtt.values() if math.isfinite(rtt)]
    out.family("tank_heartbeat_rtt_mean_seconds", "gauge", "Mean of the latest RTT per connection.")
    if rtts:
        out.sample("tank_heartbeat_rtt_mean_seconds", math.fsum(rtts) / len(rtts))
    out.family("tank_heartbeat_rtt_max_seconds", "gauge", "Largest latest RTT over connections.")
    if rtts:
        out.sample("tank_heartbeat_rtt_max_seconds", max(rtts))
    out.family(
        "tank_limit_hits_total", "counter",
        "Times a limit was met (a connection paused, refused or closed because of it).",
    )
    for name in LIMIT_NAMES:
        out.sample("tank_limit_hits_total", stats.limit_hits.get(name, 0), (("limit", name),))
    out.single("tank_partial_bytes", "gauge", "Bytes of unfinished incoming messages held.",
               stats.partial_bytes)
    out.single("tank_compressed_connections", "gauge",
               "Connections that agreed permessage-deflate.", stats.compressed_connections)
    out.single("tank_messages_compressed_total", "counter",
               "Messages compressed (once per window size per fan-out).", stats.messages_compressed)
    out.single("tank_compression_saved_bytes_total", "counter",
               "Bytes not written thanks to compression.", stats.compression_bytes_saved)
    out.single("tank_history_topics", "gauge",
               "Topics whose history offsets are remembered.", stats.history_topics)
    out.single("tank_history_publications", "gauge",
               "Publications kept in the topics' history.", stats.history_publications)
    out.single(
        "tank_shutting_down",
        "gauge",
        "1 once shutdown has begun, else 0.",
        1 if stats.shutting_down else 0,
    )
    if stats.broker_up is not None:
        out.single("tank_broker_up", "gauge", "1 while the Redis broker link is up, else 0.",
                   1 if stats.broker_up else 0)
        out.single("tank_broker_buffered", "gauge",
                   "Messages for other nodes waiting in the outage buffer.", stats.broker_buffered)
        out.single("tank_broker_nodes", "gauge",
                   "Nodes Redis counted in the cluster at the last look (this one included).",
                   stats.broker_nodes)
        for metric, help_text, value in (
            ("tank_broker_reconnects_total", "Times the broker link came back up.",
             stats.broker_reconnects),
            ("tank_broker_gaps_total", "Gaps in other nodes' sequence numbers.", stats.broker_gaps),
            ("tank_broker_missed_total", "Messages from other nodes known missed (in gaps).",
             stats.broker_missed),
            ("tank_broker_dropped_total", "Messages for other nodes dropped.",
             stats.broker_dropped),
            ("tank_broker_duplicates_total", "Messages from other nodes dropped as duplicates.",
             stats.broker_duplicates),
            ("tank_broker_published_total", "Messages Redis acknowledged.", stats.broker_published),
            ("tank_broker_received_total", "Messages from other nodes delivered here.",
             stats.broker_received),
        ):
            out.single(metric, "counter", help_text, value)
    return HttpResponse(
        status=200,
        headers=(("content-type", METRICS_CONTENT_TYPE),),
        body=encode_body(out.text()),
    )


def history_response(read: HistoryRead) -> HttpResponse:
    """``200`` with a topic's history: ``{"topic", "epoch", "offset", "complete", "more",
    "publications": [{"offset", "data", "time"}]}``, oldest first."""
    return json_response(
        200,
        {
            "topic": read.topic,
            "epoch": read.epoch,
            "offset": read.offset,
            "complete": read.complete,
            "more": read.more,
            "publications": [
                {"offset": p.offset, "data": p.data, "time": p.wall_time}
                for p in read.publications
            ],
        },
    )


def presence_response(
    topic: str, subscribers: tuple[tuple[int, str], ...], most: int = 1_000
) -> HttpResponse:
    """``200``: who is subscribed to ``topic``, ``{"topic", "connections", "users",
    "subscribers": [{"conn_id", "user_id"}]}``; at most ``most`` are listed one by one, the
    counts count them all."""
    return json_response(
        200,
        {
            "topic": topic,
            "connections": len(subscribers),
            "users": len({user for _conn, user in subscribers}),
            "subscribers": [
                {"conn_id": conn_id, "user_id": user_id} for conn_id, user_id in subscribers[:most]
            ],
        },
    )

