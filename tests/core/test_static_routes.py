"""`GET /tank.js` and `GET /` (the status page) through the server core (docs/browser.md).

tank.js is public and loadable from any origin; the status page follows the HTTP API's access
rule (API key, else loopback only), with `?apikey=KEY` accepted on `/` only. Every other path
keeps its answer (404 for unknown paths, the API's own rules for `/api/*`).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest

from tank_core.config import ServerConfig
from tank_core.server import static_files
from tank_core.testing import Harness, HttpAnswer

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "tank_core" / "server" / "static"
KEY = "s3cret key/+="
KEY_Q = quote(KEY, safe="")  # s3cret%20key%2F%2B%3D
REMOTE = "203.0.113.7"


def get(
    target: str,
    *,
    config: ServerConfig | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    peer: str = "127.0.0.1",
    method: str = "GET",
) -> HttpAnswer:
    return Harness(config).http(method, target, headers=headers, peer_host=peer)


def auth(key: str = KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", "apikey " + key),)


# --------------------------------------------------------------------------------- /tank.js


@pytest.mark.parametrize("config", [None, ServerConfig(api_key=KEY)])
@pytest.mark.parametrize("peer", ["127.0.0.1", REMOTE])
def test_tank_js_is_public_javascript_for_any_origin(config: ServerConfig | None, peer: str) -> None:
    answer = get("/tank.js", config=config, peer=peer)
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/javascript; charset=utf-8"
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.body == (STATIC / "tank.js").read_bytes()
    assert int(answer.headers["content-length"]) == len(answer.body)


def test_tank_js_exports_the_2_0_3_api_and_the_heartbeat_additions() -> None:
    source = (STATIC / "tank.js").read_text()
    assert "export class SocketClient" in source
    assert "export default { SocketClient, useSocketClient };" in source
    methods = [
        "subTopic", "unsubTopic", "destroyTopics", "send", "onOpen", "onMessage", "onClose",
        "onError", "setReConnectInterval", "disableReConnect", "close", "disconnect", "isOpen",
        "isClose", "isClosing", "isConnecting", "getOriginInstance", "setDebug", "offOpenEvent",
        "offMessageEvent", "offCloseEvent", "offErrorEvent", "onHeartbeat", "onHeartbeatTimeout",
        "onReconnect",
    ]
    for name in methods:
        assert re.search(rf"^  {name}\(", source, re.M), name
    for option in ("heartbeat: true", "heartbeatInterval: 5000", "heartbeatTimeout: 15000"):
        assert option in source
    # No dependency: not a single import in the module.
    assert not re.search(r"^\s*import\b", source, re.M)


def test_tank_js_query_string_is_ignored() -> None:
    answer = get("/tank.js?v=2")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/javascript; charset=utf-8"


@pytest.mark.parametrize("target", ["/tank.js", "/"])
def test_other_methods_are_405_and_head_has_no_body(target: str) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        answer = get(target, method=method)
        assert answer.status == 405
        assert answer.headers["allow"] == "GET, HEAD"
    head, full = get(target, method="HEAD"), get(target)
    assert head.status == 200 and head.body == b""
    assert head.headers["content-type"] == full.headers["content-type"]
    assert head.headers["content-length"] == str(len(full.body))


# --------------------------------------------------------------------------------- /


def test_status_page_is_html_for_loopback_without_a_key() -> None:
    answer = get("/")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.body == (STATIC / "status.html").read_bytes()
    page = answer.body.decode()
    assert "<canvas" in page and "api/stats" in page
    # No external assets: nothing is loaded from another origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)


def test_status_page_csp_allows_exactly_its_inline_script() -> None:
    import base64
    import hashlib

    answer = get("/")
    policy = answer.headers["content-security-policy"]
    script = re.findall(r"<script>(.*?)</script>", answer.body.decode(), re.S)
    assert len(script) == 1
    digest = base64.b64encode(hashlib.sha256(script[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_status_page_without_a_key_is_403_for_remote_peers() -> None:
    answer = get("/", peer=REMOTE)
    assert answer.status == 403
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert b"loopback" in answer.body
    # The API says the same to the same peer.
    assert get("/api/stats", peer=REMOTE).status == 403


@pytest.mark.parametrize("peer", ["127.0.0.1", REMOTE])
def test_status_page_with_a_key_needs_it(peer: str) -> None:
    keyed = ServerConfig(api_key=KEY)
    answer = get("/", config=keyed, peer=peer)
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == "apikey"
    assert b"/?apikey=KEY" in answer.body
    assert get("/", config=keyed, peer=peer, headers=auth("wrong")).status == 401
    assert get("/?apikey=wrong", config=keyed, peer=peer).status == 401
    assert get("/?apikey=", config=keyed, peer=peer).status == 401
    # The header, or the query parameter (URL-encoded), lets it in from anywhere.
    assert get("/", config=keyed, peer=peer, headers=auth()).status == 200
    ok = get(f"/?apikey={KEY_Q}", config=keyed, peer=peer)
    assert ok.status == 200
    assert ok.headers["content-type"] == "text/html; charset=utf-8"
    assert get(f"/?x=1&apikey=bad&apikey={KEY_Q}", config=keyed, peer=peer).status == 200


def test_the_query_key_opens_the_page_only_never_the_api() -> None:
    keyed = ServerConfig(api_key=KEY)
    assert get(f"/api/stats?apikey={KEY_Q}", config=keyed).status == 401
    assert get(f"/metrics?apikey={KEY_Q}", config=keyed).status == 401
    answer = get("/api/stats", config=keyed, headers=auth())
    assert answer.status == 200
    assert "connections" in json.loads(answer.body)


def test_status_page_access_is_checked_before_the_method() -> None:
    keyed = ServerConfig(api_key=KEY)
    assert get("/", config=keyed, method="POST").status == 401
    answer = get("/", config=keyed, method="POST", headers=auth())
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"


# --------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize(
    "target", ["/index.html", "/tank.js/", "/static/tank.js", "/status", "/tank.jsx", "/favicon.ico"]
)
def test_other_paths_stay_404(target: str) -> None:
    answer = get(target)
    assert answer.status == 404
    assert answer.body == b"Not Found"


def test_api_and_health_are_unchanged() -> None:
    assert get("/healthz").status == 200
    assert get("/api/stats").status == 200
    assert get("/api/nope").status == 404


def test_websocket_path_still_upgrades() -> None:
    h = Harness()
    peer = h.connect("browser")
    assert peer.take() == ["Hello, browser! Welcome to WebSocket server."]
    assert h.server.stats().connections == 1


def test_the_websocket_path_wins_when_mounted_at_root() -> None:
    answer = get("/", config=ServerConfig(path="/"))
    assert answer.status == 400  # a plain GET on the WebSocket path: not a valid upgrade


def test_static_files_are_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "server/static/*" in data["tool"]["setuptools"]["package-data"]["tank_core"]
    assert static_files.asset("tank.js") == (STATIC / "tank.js").read_bytes()
    assert static_files.asset("status.html") == (STATIC / "status.html").read_bytes()
    assert static_files.is_static_path("/") and static_files.is_static_path("/tank.js?x")
    assert not static_files.is_static_path("/api/stats")
