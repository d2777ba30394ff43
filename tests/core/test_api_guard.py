"""A safe HTTP API by default (issue 10): no cross-site POST, no foreign Host, proxies believed only
when trusted. Through ``Harness``, as a browser or a proxy would send the requests."""

from __future__ import annotations

import json

import pytest

from tank_core import ServerConfig
from tank_core.server.api_guard import forwarded_for, host_allowed
from tank_core.testing import FakeClock, Harness

BODY = json.dumps({"topic": "t", "data": "d"}).encode()


def make(**config: object) -> Harness:
    return Harness(ServerConfig(**config), clock=FakeClock(1024.0))  # type: ignore[arg-type]


def test_a_simple_form_post_from_any_page_is_refused() -> None:
    h = make()
    for path in ("/api/publish", "/api/broadcast", "/api/disconnect"):
        answer = h.http("POST", path, body=BODY, headers=[("content-type", "text/plain")])
        assert answer.status == 415, path
        assert b"application/json" in answer.body


def test_a_json_post_from_another_origin_is_refused_and_same_origin_passes() -> None:
    h = make()
    json_type = ("content-type", "application/json")
    foreign = h.http("POST", "/api/publish", body=BODY,
                     headers=[json_type, ("origin", "https://evil.example")])
    assert foreign.status == 403
    same = h.http("POST", "/api/publish", body=BODY,
                  headers=[("host", "127.0.0.1:8080"), json_type, ("origin", "http://127.0.0.1:8080")])
    assert same.status == 200


def test_with_an_api_key_the_key_is_the_rule() -> None:
    h = make(api_key="k")
    answer = h.http("POST", "/api/publish", body=BODY,
                    headers=[("content-type", "text/plain"), ("authorization", "apikey k")])
    assert answer.status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "tank.test"])
def test_a_foreign_host_cannot_read_stats_or_metrics(host: str) -> None:
    h = make()
    for path in ("/api/stats", "/metrics"):
        assert h.http("GET", path, headers=[("host", host)]).status == 403


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "[::1]:8080", "localhost", "LOCALHOST:80"])
def test_this_machine_by_address_or_localhost_passes(host: str) -> None:
    assert make().http("GET", "/api/stats", headers=[("host", host)]).status == 200


def test_a_configured_name_passes() -> None:
    h = make(allowed_hosts={"tank.internal"})
    assert h.http("GET", "/api/stats", headers=[("host", "tank.internal:8080")]).status == 200
    assert h.http("GET", "/api/stats", headers=[("host", "other.internal")]).status == 403


def test_health_needs_no_host_check() -> None:
    assert make().http("GET", "/healthz", headers=[("host", "evil.example")]).status == 200


def test_behind_a_trusted_proxy_the_forwarded_address_decides() -> None:
    h = make(trusted_proxies={"127.0.0.1"})
    outside = [("x-forwarded-for", "203.0.113.9")]
    assert h.http("GET", "/api/stats", headers=outside).status == 403
    inside = [("x-forwarded-for", "203.0.113.9, 127.0.0.1")]  # the proxy's own entry is last
    assert h.http("GET", "/api/stats", headers=inside).status == 200


def test_an_untrusted_peer_cannot_claim_loopback() -> None:
    h = make(trusted_proxies={"10.0.0.5"})
    claim = [("x-forwarded-for", "127.0.0.1")]
    assert h.http("GET", "/api/stats", headers=claim, peer_host="198.51.100.7").status == 403


def test_a_trusted_proxy_forwards_the_address_into_the_limits_and_notifications() -> None:
    h = make(trusted_proxies={"127.0.0.1"})
    peer = h.connect("u", headers=[("x-forwarded-for", "203.0.113.9")])
    assert peer.accepted
    connected = [n for n in h.notifications if type(n).__name__ == "ClientConnected"]
    assert connected[-1].peer_host == "203.0.113.9"  # type: ignore[attr-defined]


def test_the_helpers() -> None:
    assert forwarded_for([(b"x-forwarded-for", b"1.2.3.4, [::1]")]) == "::1"
    assert forwarded_for([(b"x-forwarded-for", b"garbage")]) is None
    assert host_allowed((("host", "a.localhost"),), frozenset())
    assert not host_allowed((("host", "a"), ("host", "127.0.0.1")), frozenset())
    assert host_allowed((("host", "anything"),), frozenset({"*"}))


@pytest.mark.parametrize("forwarded", ["unknown", "", "203.0.113.7:5555", "[2001:db8::1]:443"])
def test_a_forwarded_address_we_cannot_read_or_not_loopback_never_opens_the_api(
    forwarded: str,
) -> None:
    h = make(trusted_proxies={"127.0.0.1"})
    assert h.http("GET", "/api/stats", headers=[("x-forwarded-for", forwarded)]).status == 403


def test_without_the_header_a_request_came_straight_from_the_proxys_machine() -> None:
    # The proxy always adds the header: one without it is a program beside the proxy (tank pub).
    h = make(trusted_proxies={"127.0.0.1"})
    assert h.http("GET", "/api/stats").status == 200


def test_a_forwarded_address_with_a_port_is_read() -> None:
    assert forwarded_for([(b"x-forwarded-for", b"203.0.113.7:5555")]) == "203.0.113.7"
    assert forwarded_for([(b"x-forwarded-for", b"[2001:db8::1]:443")]) == "2001:db8::1"
    assert forwarded_for([(b"x-forwarded-for", b"127.0.0.1:80")]) == "127.0.0.1"
