"""The HTTP API rules of PROTOCOL.md, "Server HTTP API", one test per rule."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tank_core.config import ServerConfig
from tank_core.server.http_api import (
    BroadcastCall,
    DisconnectCall,
    HttpResponse,
    MetricsCall,
    PublishCall,
    StatsCall,
    broadcast_response,
    disconnect_response,
    error_response,
    is_api_path,
    is_loopback,
    json_response,
    not_found_response,
    publish_response,
    route_api,
    text_response,
)
from tank_core.server.reports import metrics_response, stats_response
from tank_core.server.stats import ServerStats

Headers = tuple[tuple[str, str], ...]

LOCAL = "127.0.0.1"
REMOTE = "203.0.113.7"
KEY = "s3cret-key"
OPEN = ServerConfig()
KEYED = ServerConfig(api_key=KEY)
AUTH: Headers = (("authorization", f"apikey {KEY}"),)


def call(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: Headers = (),
    peer: str = LOCAL,
    config: ServerConfig = OPEN,
) -> object:
    if method == "POST" and not any(name == "content-type" for name, _ in headers):
        headers = (*headers, ("content-type", "application/json"))  # as tank pub sends it
    return route_api(
        method=method, path=path, headers=headers, body=body, peer_host=peer, config=config
    )


def response(result: object) -> HttpResponse:
    assert isinstance(result, HttpResponse), result
    return result


def header(resp: HttpResponse, name: str) -> str:
    values = [value for key, value in resp.headers if key == name]
    assert len(values) == 1, resp.headers
    return values[0]


def error_of(result: object, status: int) -> str:
    resp = response(result)
    assert resp.status == status
    assert header(resp, "content-type") == "application/json"
    body = json.loads(resp.body)
    assert set(body) == {"error"}
    message = body["error"]
    assert isinstance(message, str)
    return message


def post(path: str, value: object) -> object:
    return call("POST", path, json.dumps(value).encode())


# --- /healthz ----------------------------------------------------------------------------------


def test_healthz_is_200_ok_text() -> None:
    resp = response(call("GET", "/healthz"))
    assert (resp.status, resp.body) == (200, b"ok")
    assert header(resp, "content-type") == "text/plain; charset=utf-8"


def test_healthz_needs_no_auth_and_no_loopback() -> None:
    assert response(call("GET", "/healthz", peer=REMOTE)).status == 200
    assert response(call("GET", "/healthz", peer=REMOTE, config=KEYED)).status == 200


def test_healthz_wrong_method_is_405_with_allow() -> None:
    resp = response(call("POST", "/healthz"))
    assert resp.status == 405
    assert header(resp, "allow") == "GET"


def test_query_string_is_ignored() -> None:
    assert call("GET", "/api/stats?pretty=1") == StatsCall()
    assert response(call("GET", "/healthz?x")).status == 200


# --- is_api_path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/publish",
        "/api/broadcast",
        "/api/disconnect",
        "/api/stats",
        "/api/other",
        "/api/",
        "/api/stats?x=1",
        "/metrics",
        "/healthz",
    ],
)
def test_api_paths(path: str) -> None:
    assert is_api_path(path)


@pytest.mark.parametrize("path", ["/ws", "/", "", "/api", "/apis", "/metrics/", "/healthz/x"])
def test_non_api_paths(path: str) -> None:
    assert not is_api_path(path)


def test_non_api_path_gets_plain_404() -> None:
    assert call("GET", "/nowhere", peer=REMOTE) == not_found_response()


# --- loopback rule (no API key configured) -------------------------------------------------------


@pytest.mark.parametrize(
    "peer", ["127.0.0.1", "127.255.10.3", "::1", "::ffff:127.0.0.1", "::ffff:127.9.8.7"]
)
def test_loopback_peers_are_allowed_without_key(peer: str) -> None:
    assert is_loopback(peer)
    assert call("GET", "/api/stats", peer=peer) == StatsCall()


@pytest.mark.parametrize(
    "peer",
    [
        "10.0.0.1",
        "203.0.113.7",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "::",
        "0.0.0.0",
        "",
        "localhost",
        "/run/tank.sock",
        "not an address",
        "[::1]",
    ],
)
def test_other_peers_are_403_without_key(peer: str) -> None:
    assert not is_loopback(peer)
    message = error_of(call("GET", "/api/stats", peer=peer), 403)
    assert "loopback" in message


def test_loopback_rule_covers_metrics_too() -> None:
    error_of(call("GET", "/metrics", peer=REMOTE), 403)
    assert call("GET", "/metrics") == MetricsCall()


def test_access_is_checked_before_routing() -> None:
    error_of(call("GET", "/api/nope", peer=REMOTE), 403)
    error_of(call("DELETE", "/api/publish", peer=REMOTE), 403)


# --- API key rule --------------------------------------------------------------------------------


def test_right_key_from_anywhere() -> None:
    assert call("GET", "/api/stats", headers=AUTH, peer=REMOTE, config=KEYED) == StatsCall()
    assert call("GET", "/metrics", headers=AUTH, peer="", config=KEYED) == MetricsCall()


@pytest.mark.parametrize("scheme", ["apikey", "APIKEY", "ApiKey", "aPiKeY"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    headers = (("authorization", f"{scheme} {KEY}"),)
    assert call("GET", "/api/stats", headers=headers, config=KEYED) == StatsCall()


def test_extra_whitespace_around_credentials_is_tolerated() -> None:
    headers = (("authorization", f"  apikey \t {KEY}  "),)
    assert call("GET", "/api/stats", headers=headers, config=KEYED) == StatsCall()


def _assert_401(result: object) -> str:
    message = error_of(result, 401)
    assert header(response(result), "www-authenticate") == "apikey"
    return message


def test_missing_key_is_401_even_from_loopback() -> None:
    message = _assert_401(call("GET", "/api/stats", peer=LOCAL, config=KEYED))
    assert "Authorization" in message


def test_missing_key_on_metrics_is_401() -> None:
    _assert_401(call("GET", "/metrics", config=KEYED))


@pytest.mark.parametrize(
    "value", [f"apikey {KEY}x", f"apikey {KEY[:-1]}", "apikey", "apikey ", f"apikey {KEY.upper()}"]
)
def test_wrong_key_is_401(value: str) -> None:
    _assert_401(call("GET", "/api/stats", headers=(("authorization", value),), config=KEYED))


@pytest.mark.parametrize("value", [f"Bearer {KEY}", f"Basic {KEY}", KEY, f"apikey:{KEY}"])
def test_other_scheme_is_401(value: str) -> None:
    _assert_401(call("GET", "/api/stats", headers=(("authorization", value),), config=KEYED))


def test_two_authorization_headers_are_401() -> None:
    _assert_401(call("GET", "/api/stats", headers=AUTH + AUTH, config=KEYED))


def test_auth_header_name_case_is_tolerated() -> None:
    headers = (("Authorization", f"apikey {KEY}"),)
    assert call("GET", "/api/stats", headers=headers, config=KEYED) == StatsCall()


def test_non_ascii_key_matches_latin1_or_utf8_decoded_header() -> None:
    config = ServerConfig(api_key="clé-🔑")
    wire = "apikey clé-🔑".encode()
    for decoded in (wire.decode("latin-1"), wire.decode("utf-8")):
        headers = (("authorization", decoded),)
        assert call("GET", "/api/stats", headers=headers, config=config) == StatsCall()


def test_key_check_comes_before_404_405_and_413() -> None:
    config = ServerConfig(api_key=KEY, max_request_size=4)
    _assert_401(call("GET", "/api/nope", config=config))
    _assert_401(call("GET", "/api/publish", config=config))
    _assert_401(call("POST", "/api/publish", b"x" * 100, config=config))


# --- the calls -----------------------------------------------------------------------------------


def test_publish() -> None:
    assert post("/api/publish", {"topic": "news", "data": "hi"}) == PublishCall(
        topic="news", data="hi"
    )


@pytest.mark.parametrize("topic", ["", "a:b:c", "sub:x", "with space", "é🎉", '"\\\n'])
def test_publish_topic_may_be_empty_or_anything(topic: str) -> None:
    assert post("/api/publish", {"topic": topic, "data": "d"}) == PublishCall(topic=topic, data="d")


def test_publish_ignores_extra_fields() -> None:
    value = {"topic": "t", "data": "d", "extra": [1, 2]}
    assert post("/api/publish", value) == PublishCall(topic="t", data="d")


def test_broadcast() -> None:
    assert post("/api/broadcast", {"data": "all"}) == BroadcastCall(data="all")


def test_disconnect() -> None:
    assert post("/api/disconnect", {"user_id": "u-1"}) == DisconnectCall(user_id="u-1")


def test_stats_and_metrics_calls() -> None:
    assert call("GET", "/api/stats") == StatsCall()
    assert call("GET", "/metrics") == MetricsCall()


def test_get_ignores_a_body() -> None:
    assert call("GET", "/api/stats", b"\xff garbage") == StatsCall()


# --- 400: body and fields ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/disconnect"])
@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"data": "x",}', b"\xef\xbb\xbf{}"])
def test_bad_json_is_400(path: str, body: bytes) -> None:
    assert "not valid JSON" in error_of(call("POST", path, body), 400)


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/disconnect"])
@pytest.mark.parametrize("body", [b"[]", b'"text"', b"null", b"42", b"true"])
def test_non_object_json_is_400(path: str, body: bytes) -> None:
    assert "JSON object" in error_of(call("POST", path, body), 400)


@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/disconnect"])
def test_body_not_utf8_is_400(path: str) -> None:
    assert "UTF-8" in error_of(call("POST", path, b'{"data": "\xff"}'), 400)


def test_deeply_nested_json_is_400_not_a_crash() -> None:
    depth = 200_000
    error_of(call("POST", "/api/publish", b"[" * depth + b"]" * depth), 400)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("/api/publish", {"data": "d"}, "topic"),
        ("/api/publish", {"topic": "t"}, "data"),
        ("/api/publish", {}, "topic"),
        ("/api/broadcast", {}, "data"),
        ("/api/broadcast", {"topic": "t"}, "data"),
        ("/api/disconnect", {}, "user_id"),
        ("/api/disconnect", {"userId": "u"}, "user_id"),
    ],
)
def test_missing_field_is_400_naming_it(path: str, value: object, field: str) -> None:
    assert error_of(post(path, value), 400) == f"field '{field}' is required"


@pytest.mark.parametrize("bad", [1, 1.5, None, True, [], {}, ["x"]])
@pytest.mark.parametrize(
    ("path", "base", "field"),
    [
        ("/api/publish", {"topic": "t", "data": "d"}, "topic"),
        ("/api/publish", {"topic": "t", "data": "d"}, "data"),
        ("/api/broadcast", {"data": "d"}, "data"),
        ("/api/disconnect", {"user_id": "u"}, "user_id"),
    ],
)
def test_mistyped_field_is_400_naming_it(
    path: str, base: dict[str, object], field: str, bad: object
) -> None:
    value = {**base, field: bad}
    assert error_of(post(path, value), 400) == f"field '{field}' must be a string"


def test_nan_literal_is_a_mistyped_field() -> None:
    body = b'{"topic": "t", "data": NaN}'
    assert error_of(call("POST", "/api/publish", body), 400) == "field 'data' must be a string"


def test_lone_surrogate_in_data_is_passed_through() -> None:
    result = call("POST", "/api/broadcast", b'{"data": "\\ud800"}')
    assert result == BroadcastCall(data="\ud800")


# --- 404, 405, 413 -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/nope", "/api/", "/api/stats/", "/api/Publish"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_api_path_is_404_json(method: str, path: str) -> None:
    assert error_of(call(method, path), 404) == "not found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/publish", "POST"),
        ("PUT", "/api/broadcast", "POST"),
        ("DELETE", "/api/disconnect", "POST"),
        ("POST", "/api/stats", "GET"),
        ("HEAD", "/api/stats", "GET"),
        ("POST", "/metrics", "GET"),
        ("post", "/api/publish", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(method: str, path: str, allow: str) -> None:
    result = call(method, path, b'{"topic": "t", "data": "d", "user_id": "u"}')
    error_of(result, 405)
    assert header(response(result), "allow") == allow


def test_body_over_limit_is_413() -> None:
    config = ServerConfig(max_request_size=32)
    body = json.dumps({"topic": "t", "data": "x" * 64}).encode()
    assert "32" in error_of(call("POST", "/api/publish", body, config=config), 413)
    error_of(call("GET", "/api/stats", b"x" * 33, config=config), 413)


def test_body_at_limit_is_accepted() -> None:
    body = json.dumps({"topic": "t", "data": "x"}).encode()
    config = ServerConfig(max_request_size=len(body))
    assert call("POST", "/api/publish", body, config=config) == PublishCall(topic="t", data="x")


# --- renderers -----------------------------------------------------------------------------------


def test_publish_broadcast_disconnect_responses_are_compact_json() -> None:
    for resp, body in [
        (publish_response(3), b'{"delivered":3}'),
        (broadcast_response(0), b'{"delivered":0}'),
        (disconnect_response(2), b'{"closed":2}'),
    ]:
        assert (resp.status, resp.body) == (200, body)
        assert resp.headers == (("content-type", "application/json"),)


def test_error_and_not_found_helpers() -> None:
    resp = error_response(418, "teapot ☕")
    assert (resp.status, resp.body) == (418, '{"error":"teapot ☕"}'.encode())
    assert header(resp, "content-type") == "application/json"
    resp = not_found_response()
    assert (resp.status, resp.body) == (404, b"Not Found")
    assert header(resp, "content-type") == "text/plain; charset=utf-8"


def test_json_and_text_helpers_take_extra_headers() -> None:
    resp = json_response(201, [1, "é"], headers=(("x-a", "b"),))
    assert resp.body == '[1,"é"]'.encode()
    assert resp.headers == (("content-type", "application/json"), ("x-a", "b"))
    resp = text_response(200, "ünï", headers=(("x-a", "b"),))
    assert resp.body == "ünï".encode()


STATS = ServerStats(
    connections=3,
    topics={"news": 2, "café": 1, 'we"ird\\\ntopic': 4},
    messages_in=10,
    messages_out=20,
    pings_sent=5,
    pongs_received=4,
    heartbeat_timeouts=1,
    slow_consumer_closes=2,
    connections_total=7,
    messages_dropped=6,
    outbox_bytes=1234,
    rtt={7: 0.25, 9: 0.75},
    http_requests=11,
    compressed_connections=2,
    messages_compressed=8,
    compression_bytes_saved=900,
    history_topics=4,
    history_publications=40,
    shutting_down=True,
)


def test_stats_json_has_every_field() -> None:
    resp = stats_response(STATS)
    assert resp.status == 200
    assert header(resp, "content-type") == "application/json"
    assert b": " not in resp.body and b", " not in resp.body  # compact separators
    assert "café".encode() in resp.body  # ensure_ascii=False
    body = json.loads(resp.body)
    assert body == {
        "connections": 3,
        "topics": {"news": 2, "café": 1, 'we"ird\\\ntopic': 4},
        "topics_total": 3,
        "messages_in": 10,
        "messages_out": 20,
        "pings_sent": 5,
        "pongs_received": 4,
        "heartbeat_timeouts": 1,
        "slow_consumer_closes": 2,
        "connections_total": 7,
        "messages_dropped": 6,
        "outbox_bytes": 1234,
        "rtt": {"7": 0.25, "9": 0.75},
        "http_requests": 11,
        "limit_hits": {},
        "partial_bytes": 0,
        "compressed_connections": 2,
        "messages_compressed": 8,
        "compression_bytes_saved": 900,
        "history_topics": 4,
        "history_publications": 40,
        "shutting_down": True,
    }


def test_stats_survive_odd_values() -> None:
    stats = ServerStats(connections=0, topics={"\udcff": 1}, rtt={1: float("nan")})
    body = json.loads(stats_response(stats).body)
    assert body["rtt"] == {"1": None}
    assert body["topics"] == {"\udcff": 1}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(?:,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict reader for what we emit: HELP and TYPE before each family's samples."""
    assert text.endswith("\n")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in typed
            assert kind in ("counter", "gauge")
            assert name.endswith("_total") == (kind == "counter")
            typed[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, raw_labels, value = match.groups()
        assert name.startswith("tank_") and name in typed
        labels: tuple[tuple[str, str], ...] = ()
        if raw_labels is not None:
            found = _LABEL.findall(raw_labels)
            assert "".join(f'{k}="{v}",' for k, v in found)[:-1] == raw_labels
            labels = tuple((k, _unescape(v)) for k, v in found)
        key = (name, labels)
        assert key not in samples
        samples[key] = float(value)
    return samples


def test_metrics_content_type_and_values() -> None:
    resp = metrics_response(STATS)
    assert resp.status == 200
    assert header(resp, "content-type") == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_metrics(resp.body.decode())
    assert samples[("tank_connections", ())] == 3
    assert samples[("tank_topics", ())] == 3
    assert samples[("tank_outbox_bytes", ())] == 1234
    assert samples[("tank_messages_in_total", ())] == 10
    assert samples[("tank_messages_out_total", ())] == 20
    assert samples[("tank_pings_sent_total", ())] == 5
    assert samples[("tank_pongs_received_total", ())] == 4
    assert samples[("tank_heartbeat_timeouts_total", ())] == 1
    assert samples[("tank_slow_consumer_closes_total", ())] == 2
    assert samples[("tank_connections_accepted_total", ())] == 7
    assert samples[("tank_messages_dropped_total", ())] == 6
    assert samples[("tank_http_requests_total", ())] == 11
    assert samples[("tank_heartbeat_rtt_mean_seconds", ())] == 0.5
    assert samples[("tank_heartbeat_rtt_max_seconds", ())] == 0.75
    assert samples[("tank_shutting_down", ())] == 1
    assert samples[("tank_topic_subscribers", (("topic", "news"),))] == 2
    assert samples[("tank_topic_subscribers", (("topic", "café"),))] == 1


def test_metrics_label_values_are_escaped() -> None:
    text = metrics_response(STATS).body.decode()
    assert 'tank_topic_subscribers{topic="we\\"ird\\\\\\ntopic"} 4\n' in text
    samples = parse_metrics(text)
    assert samples[("tank_topic_subscribers", (("topic", 'we"ird\\\ntopic'),))] == 4


def test_metrics_when_idle() -> None:
    samples = parse_metrics(metrics_response(ServerStats(connections=0)).body.decode())
    assert samples[("tank_shutting_down", ())] == 0
    assert samples[("tank_topics", ())] == 0
    assert not any(name == "tank_topic_subscribers" for name, _ in samples)
    assert not any(name.startswith("tank_heartbeat_rtt") for name, _ in samples)


# --- properties ----------------------------------------------------------------------------------

_methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "get"]), st.text(max_size=8))
_paths = st.one_of(
    st.sampled_from(
        ["/api/publish", "/api/broadcast", "/api/disconnect", "/api/stats", "/metrics", "/healthz"]
    ),
    st.text(max_size=20).map(lambda s: "/api/" + s),
    st.text(max_size=20),
)
_headers = st.lists(
    st.tuples(
        st.one_of(st.just("authorization"), st.text(max_size=10)),
        st.one_of(st.just(f"apikey {KEY}"), st.text(max_size=30)),
    ),
    max_size=4,
).map(tuple)
_bodies = st.one_of(
    st.binary(max_size=64),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["topic", "data", "user_id", "x"]) | st.text(max_size=5),
                inner,
                max_size=4,
            )
        ),
        max_leaves=8,
    ).map(lambda v: json.dumps(v).encode()),
)
_peers = st.one_of(
    st.sampled_from(["127.0.0.1", "::1", "::ffff:127.0.0.1", "10.1.2.3", "", "::ffff:1.2.3.4"]),
    st.ip_addresses().map(str),
    st.text(max_size=20),
)
_configs = st.builds(
    ServerConfig,
    api_key=st.one_of(st.none(), st.just(KEY), st.text(min_size=1, max_size=10)),
    max_request_size=st.integers(min_value=1, max_value=128),
)


@given(
    method=_methods,
    path=_paths,
    headers=_headers,
    body=_bodies,
    peer=_peers,
    config=_configs,
)
def test_route_api_never_raises(
    method: str, path: str, headers: Headers, body: bytes, peer: str, config: ServerConfig
) -> None:
    result = route_api(
        method=method, path=path, headers=headers, body=body, peer_host=peer, config=config
    )
    assert isinstance(
        result,
        HttpResponse | PublishCall | BroadcastCall | DisconnectCall | StatsCall | MetricsCall,
    )
    if isinstance(result, HttpResponse):
        assert all(name == name.lower() for name, _ in result.headers)
        if not is_api_path(path):
            assert result == not_found_response()
        elif result.status >= 400:
            assert set(json.loads(result.body)) == {"error"}
        else:
            assert result == text_response(200, "ok")


@given(topics=st.dictionaries(st.text(), st.integers(min_value=0, max_value=10**6), max_size=5))
def test_metrics_round_trip_any_topic(topics: dict[str, int]) -> None:
    stats = ServerStats(connections=len(topics), topics=topics)
    samples = parse_metrics(metrics_response(stats).body.decode("utf-8"))
    got = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "tank_topic_subscribers"
    }
    expected = {
        topic.encode("utf-8", "backslashreplace").decode(): n for topic, n in topics.items()
    }
    assert got == expected
    json.loads(stats_response(stats).body)
