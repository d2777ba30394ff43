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
from dataclasses import dataclass

from ..config import ServerConfig
from .api_guard import cross_site_problem, host_allowed

__all__ = [
    "JSON_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "ApiCall",
    "BroadcastCall",
    "DisconnectCall",
    "HistoryCall",
    "HttpResponse",
    "MetricsCall",
    "PresenceCall",
    "PublishCall",
    "StatsCall",
    "broadcast_response",
    "check_access",
    "cluster_response",
    "disconnect_response",
    "encode_body",
    "error_response",
    "is_api_path",
    "is_loopback",
    "json_response",
    "not_found_response",
    "publish_response",
    "route_api",
    "text_response",
]

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

Headers = tuple[tuple[str, str], ...]


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    """A complete response. Header names are lowercase; no framing headers are included."""

    status: int
    headers: Headers
    body: bytes


def encode_body(text: str) -> bytes:
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
        body=encode_body(_dumps(value)),
    )


def text_response(status: int, text: str, *, headers: Headers = ()) -> HttpResponse:
    """``text`` as UTF-8, ``content-type: text/plain; charset=utf-8``."""
    return HttpResponse(
        status=status,
        headers=(("content-type", TEXT_CONTENT_TYPE), *headers),
        body=encode_body(text),
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


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryCall:
    """``GET /api/history?topic=T&since=O&epoch=E&limit=N``: ``history_response`` of what the
    history store reads (``since`` None: the latest ``limit``)."""

    topic: str
    since: int | None
    epoch: str | None
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceCall:
    """``GET /api/presence?topic=T``: who is subscribed to ``topic`` (``presence_response``)."""

    topic: str


ApiCall = (
    PublishCall | BroadcastCall | DisconnectCall | StatsCall | MetricsCall | ReadyCall | HistoryCall
    | PresenceCall
)

#: The most publications one ``/api/history`` answer holds (and its default).
HISTORY_LIMIT = 1000
HISTORY_DEFAULT = 100


def _parse_history(query: tuple[tuple[str, str], ...]) -> HistoryCall | HttpResponse:
    values = dict(query)
    topic = values.get("topic")
    if topic is None:
        return error_response(400, "missing query parameter 'topic'")
    numbers: dict[str, int | None] = {}
    for name, default, top in (("since", None, None), ("limit", HISTORY_DEFAULT, HISTORY_LIMIT)):
        text = values.get(name)
        if text is None:
            numbers[name] = default
            continue
        if not text.isascii() or not text.isdigit():
            return error_response(400, f"query parameter '{name}' must be an integer >= 0")
        number = int(text)
        if top is not None and not 1 <= number <= top:
            return error_response(400, f"query parameter '{name}' must be 1 to {top}")
        numbers[name] = number
    limit = numbers["limit"]
    assert limit is not None
    return HistoryCall(topic=topic, since=numbers["since"], epoch=values.get("epoch"), limit=limit)


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
    query: tuple[tuple[str, str], ...] = (),
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
        case ("GET", "/api/presence"):
            if config.broker is not None:
                # Who is subscribed on the other nodes is theirs to say (issue 11): not yet.
                return error_response(501, "presence is not available on a cluster yet")
            topic = dict(query).get("topic")
            if topic is None:
                return error_response(400, "missing query parameter 'topic'")
            return PresenceCall(topic=topic)
        case ("GET", "/api/history"):
            if config.history is None:
                return error_response(404, "no history is kept (ServerConfig.history)")
            return _parse_history(query)
        case ("GET", "/metrics"):
            return MetricsCall()
        case (_, "/api/publish" | "/api/broadcast" | "/api/disconnect"):
            return _method_not_allowed("POST")
        case (_, "/api/stats" | "/metrics" | "/api/history" | "/api/presence"):
            return _method_not_allowed("GET")
        case _:
            return error_response(404, "not found")
