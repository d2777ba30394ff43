"""The HTTP API as pure functions: a parsed request in, a response or an engine command out.

PROTOCOL.md, "Server HTTP API": ``/api/publish``, ``/api/broadcast``, ``/api/disconnect``,
``/api/stats``, ``/metrics`` and ``/healthz``; JSON in, JSON out, UTF-8; a bad body is ``400``
naming the field. "When an API key is configured, every ``/api/*`` and ``/metrics`` request needs
``Authorization: apikey KEY``, else ``401``. With no key configured, they answer only requests from
loopback addresses (``403`` otherwise)." Both rules live here and nowhere else.

``route_api`` never raises on what a peer sends: every bad request becomes an ``HttpResponse``; a
good one becomes an ``ApiCall`` that the server executes against the engine, then renders with
``publish_response`` and friends. Responses carry no framing headers (``content-length``,
``connection``): the wire layer adds those.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass

from ..config import ServerConfig
from ..limits import LIMIT_NAMES
from .api_guard import cross_site_problem, host_allowed
from .stats import ServerStats

__all__ = [
    "JSON_CONTENT_TYPE",
    "METRICS_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "ApiCall",
    "BroadcastCall",
    "DisconnectCall",
    "HttpResponse",
    "MetricsCall",
    "PublishCall",
    "StatsCall",
    "broadcast_response",
    "check_access",
    "cluster_response",
    "disconnect_response",
    "error_response",
    "is_api_path",
    "is_loopback",
    "json_response",
    "metrics_response",
    "not_found_response",
    "publish_response",
    "route_api",
    "stats_response",
    "text_response",
]

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
#: Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Headers = tuple[tuple[str, str], ...]


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    """A complete response. Header names are lowercase; no framing headers are included."""

    status: int
    headers: Headers
    body: bytes


def _encode(text: str) -> bytes:
    # Topics and data may hold lone surrogates (JSON ``"\ud800"`` in API input); they have no
    # UTF-8 form. ``backslashreplace`` writes them as ``\ud800``-style escapes, which JSON also reads.
    return text.encode("utf-8", "backslashreplace")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: The answer to a socket over ``limits.max_connections``, written before its request is read.
OVERLOADED_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nretry-after: 10\r\nconnection: close\r\n\r\nToo many connections\n"
)


def json_response(status: int, value: object, *, headers: Headers = ()) -> HttpResponse:
    """``value`` as compact UTF-8 JSON, ``content-type: application/json``."""
    return HttpResponse(
        status=status,
        headers=(("content-type", JSON_CONTENT_TYPE), *headers),
        body=_encode(_dumps(value)),
    )


def text_response(status: int, text: str, *, headers: Headers = ()) -> HttpResponse:
    """``text`` as UTF-8, ``content-type: text/plain; charset=utf-8``."""
    return HttpResponse(
        status=status,
        headers=(("content-type", TEXT_CONTENT_TYPE), *headers),
        body=_encode(text),
    )


def error_response(status: int, message: str, *, headers: Headers = ()) -> HttpResponse:
    """``{"error": message}`` with ``status``."""
    return json_response(status, {"error": message}, headers=headers)


def not_found_response() -> HttpResponse:
    """The plain ``404 Not Found`` for a path that is neither the WebSocket path nor the API."""
    return text_response(404, "Not Found")


def publish_response(delivered: int) -> HttpResponse:
    """``200 {"delivered": N}``: N subscribers on this node the message was queued to."""
    return json_response(200, {"delivered": delivered})


def broadcast_response(delivered: int) -> HttpResponse:
    """``200 {"delivered": N}``: N connections on this node the message was queued to."""
    return json_response(200, {"delivered": delivered})


def disconnect_response(closed: int) -> HttpResponse:
    """``200 {"closed": N}``: N connections with that user id closed with 1000."""
    return json_response(200, {"closed": closed})


def cluster_response(what: str, count: int, broker: str) -> HttpResponse:
    """The answer of a cluster node (docs/scale-out.md): ``{"delivered": N, "broker": "up"}`` for
    a publish or broadcast (``{"closed": N, ...}`` for a disconnect), N counted on this node;
    ``"partial"``: some nodes known before were missing and did not get it; ``"down"``: the other
    nodes were not reached."""
    key = "closed" if what == "disconnect" else "delivered"
    return json_response(200, {key: count, "broker": broker})


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
        body=_encode(out.text()),
    )


# --- engine commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishCall:
    """``POST /api/publish``: queue ``data`` to the subscribers of ``topic``."""

    topic: str
    data: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BroadcastCall:
    """``POST /api/broadcast``: queue ``data`` to every connection."""

    data: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DisconnectCall:
    """``POST /api/disconnect``: close every connection of ``user_id`` with 1000."""

    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsCall:
    """``GET /api/stats``: answer with ``stats_response(snapshot)``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyCall:
    """``GET /readyz``: 200 ``ready``, or 503 while shutting down or while the broker is down."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsCall:
    """``GET /metrics``: answer with ``metrics_response(snapshot)``."""


ApiCall = PublishCall | BroadcastCall | DisconnectCall | StatsCall | MetricsCall | ReadyCall


# --- routing -----------------------------------------------------------------------------------


def _strip_query(target: str) -> str:
    return target.partition("?")[0]


def is_api_path(path: str) -> bool:
    """True for ``/api/...``, ``/metrics`` and ``/healthz`` (a query string is ignored)."""
    path = _strip_query(path)
    return path.startswith("/api/") or path in ("/metrics", "/healthz", "/readyz")


def is_loopback(peer_host: str) -> bool:
    """True for 127.0.0.0/8, ``::1`` and ``::ffff:127.x.x.x``; False for anything not an IP."""
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _header_bytes(value: str) -> tuple[bytes, ...]:
    # Header values should arrive decoded with latin-1 (lossless for h11's bytes); a caller that
    # decoded UTF-8 instead gets the UTF-8 reading too, so a non-ASCII key works either way.
    forms = [value.encode("utf-8", "surrogatepass")]
    with contextlib.suppress(UnicodeEncodeError):
        forms.append(value.encode("latin-1"))
    return tuple(forms)


def _unauthorized(message: str) -> HttpResponse:
    return error_response(401, message, headers=(("www-authenticate", "apikey"),))


def check_access(headers: Headers, peer_host: str, config: ServerConfig) -> HttpResponse | None:
    """``None`` when the request may proceed, else the 401 or 403 answer.

    The rule of every ``/api/*`` and ``/metrics`` request (and of the status page, see
    ``static_files``): with an API key configured, exactly one ``Authorization: apikey KEY``
    header; without one, a loopback peer. ``headers`` have lowercase names.
    """
    if config.api_key is None:
        if not is_loopback(peer_host):
            return error_response(
                403, "the HTTP API answers only loopback clients when no API key is configured"
            )
        if not host_allowed(headers, config.allowed_hosts):
            # api_guard.py: a name that is not this machine's may be DNS rebinding.
            return error_response(
                403, "Host not allowed without an API key: use an IP address, localhost or "
                "a name in allowed_hosts (tank serve --allowed-host)"
            )
        return None
    values = [value for name, value in headers if name.lower() == "authorization"]
    if not values:
        return _unauthorized("missing Authorization header; send 'Authorization: apikey KEY'")
    if len(values) > 1:
        return _unauthorized("send exactly one Authorization header")
    # RFC 9110 §11.4: ``credentials = auth-scheme [ 1*SP token68 ]``; scheme case-insensitive.
    raw = values[0].strip(" \t")
    cut = next((i for i, char in enumerate(raw) if char in " \t"), len(raw))
    scheme, credentials = raw[:cut], raw[cut:].strip(" \t")
    if scheme.lower() != "apikey":
        return _unauthorized("unsupported authorization scheme; send 'Authorization: apikey KEY'")
    expected = config.api_key.encode("utf-8", "surrogatepass")
    # Evaluate every candidate form: no short-circuit on the secret.
    matches = [hmac.compare_digest(form, expected) for form in _header_bytes(credentials)]
    if any(matches):
        return None
    return _unauthorized("invalid API key")


def _method_not_allowed(allowed: str) -> HttpResponse:
    return error_response(405, "method not allowed", headers=(("allow", allowed),))


def _json_object(body: bytes) -> dict[str, object] | HttpResponse:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return error_response(400, "request body is not valid UTF-8")
    try:
        value = json.loads(text)
    except ValueError as exc:
        return error_response(400, f"request body is not valid JSON: {exc}")
    except RecursionError:
        return error_response(400, "request body is not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        return error_response(400, "request body must be a JSON object")
    return value


def _string_field(obj: dict[str, object], name: str) -> str | HttpResponse:
    if name not in obj:
        return error_response(400, f"field {name!r} is required")
    value = obj[name]
    if not isinstance(value, str):
        return error_response(400, f"field {name!r} must be a string")
    return value


def _parse_publish(body: bytes) -> PublishCall | HttpResponse:
    obj = _json_object(body)
    if isinstance(obj, HttpResponse):
        return obj
    topic = _string_field(obj, "topic")
    if isinstance(topic, HttpResponse):
        return topic
    data = _string_field(obj, "data")
    if isinstance(data, HttpResponse):
        return data
    return PublishCall(topic=topic, data=data)


def _parse_broadcast(body: bytes) -> BroadcastCall | HttpResponse:
    obj = _json_object(body)
    if isinstance(obj, HttpResponse):
        return obj
    data = _string_field(obj, "data")
    if isinstance(data, HttpResponse):
        return data
    return BroadcastCall(data=data)


def _parse_disconnect(body: bytes) -> DisconnectCall | HttpResponse:
    obj = _json_object(body)
    if isinstance(obj, HttpResponse):
        return obj
    user_id = _string_field(obj, "user_id")
    if isinstance(user_id, HttpResponse):
        return user_id
    return DisconnectCall(user_id=user_id)


def route_api(
    *,
    method: str,
    path: str,
    headers: Headers,
    body: bytes,
    peer_host: str,
    config: ServerConfig,
) -> ApiCall | HttpResponse:
    """Decide one API request: the command to run, or the complete answer.

    ``path`` is the request target (a query string is ignored); ``headers`` have lowercase
    names and values decoded with latin-1; ``peer_host`` is the peer's IP address as text
    (anything else, such as a unix socket path or ``""``, is not loopback). Order: ``/healthz``
    (no auth), a non-API path (plain 404), then 401/403, 413, 404, 405, 400.
    """
    path = _strip_query(path)
    if path == "/healthz":
        if method != "GET":
            return _method_not_allowed("GET")
        return text_response(200, "ok")  # alive: the process answers
    if path == "/readyz":
        if method != "GET":
            return _method_not_allowed("GET")
        return ReadyCall()  # ready: decided by the server's state
    if not is_api_path(path):
        return not_found_response()
    denied = check_access(headers, peer_host, config)
    if denied is not None:
        return denied
    if method == "POST" and config.api_key is None:
        problem = cross_site_problem(headers, config.allowed_origins)
        if problem is not None:
            return error_response(*problem)
    if len(body) > config.max_request_size:
        return error_response(
            413, f"request body too large (limit {config.max_request_size} bytes)"
        )
    match (method, path):
        case ("POST", "/api/publish"):
            call = _parse_publish(body)
            most = config.limits.max_topic_length
            if isinstance(call, PublishCall) and len(call.topic.encode("utf-8", "surrogatepass")) > most:
                return error_response(400, f"field 'topic' is longer than {most} bytes")
            return call
        case ("POST", "/api/broadcast"):
            return _parse_broadcast(body)
        case ("POST", "/api/disconnect"):
            return _parse_disconnect(body)
        case ("GET", "/api/stats"):
            return StatsCall()
        case ("GET", "/metrics"):
            return MetricsCall()
        case (_, "/api/publish" | "/api/broadcast" | "/api/disconnect"):
            return _method_not_allowed("POST")
        case (_, "/api/stats" | "/metrics"):
            return _method_not_allowed("GET")
        case _:
            return error_response(404, "not found")
