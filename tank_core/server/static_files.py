"""The browser side of ``tank serve``: ``GET /tank.js`` (the JS client) and ``GET /`` (status page).

Both files are package data (``tank_core/server/static``), read once with ``importlib.resources`` on first
use and kept in memory; every later request is answered from memory, as pure functions of the
request. docs/browser.md describes them.

- ``/tank.js`` is public (it holds no secret), with ``access-control-allow-origin: *`` so that pages
  of any origin can ``import`` it (module scripts are fetched with CORS).
- ``/`` follows the HTTP API's rule (``http_api.check_access``): with an API key configured it
  needs ``Authorization: apikey KEY``, or, because a browser cannot send a header when it opens a
  page, the query parameter ``apikey=KEY`` (``/?apikey=KEY``; the page then sends the header itself
  with each ``/api/stats`` poll). Without a key it answers loopback peers only (``403`` otherwise).
  The query parameter is accepted on ``/`` only, never on ``/api/*``.

``route_static`` returns ``None`` for any other path, so the server's routing goes on unchanged.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from importlib import resources

from ..config import ServerConfig
from . import http_api
from .http_api import HttpResponse

__all__ = [
    "HTML_CONTENT_TYPE",
    "JS_CONTENT_TYPE",
    "STATUS_PATH",
    "TANK_JS_PATH",
    "asset",
    "is_static_path",
    "page_access",
    "route_static",
    "status_page_response",
    "tank_js_response",
]

TANK_JS_PATH = "/tank.js"
STATUS_PATH = "/"
JS_CONTENT_TYPE = "text/javascript; charset=utf-8"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"

_FILES = {TANK_JS_PATH: "tank.js", STATUS_PATH: "status.html"}

#: HEAD gets the GET answer's headers without the body (the server's serializer drops it).
_METHODS = ("GET", "HEAD")

Headers = tuple[tuple[str, str], ...]
Query = tuple[tuple[str, str], ...]


@functools.cache
def asset(name: str) -> bytes:
    """The bytes of ``tank_core/server/static/NAME`` (read once, then cached)."""
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()


def is_static_path(path: str) -> bool:
    """True for ``/tank.js`` and ``/`` (a query string is ignored)."""
    return path.partition("?")[0] in _FILES


@functools.cache
def _status_page_headers() -> Headers:
    # The page's one inline script is allowed by its hash; nothing else may run or load, and the
    # page may talk to its own origin only. Inline styles are harmless and allowed.
    page = asset("status.html").decode("utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode() + "'"
        for s in scripts
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return (
        ("content-type", HTML_CONTENT_TYPE),
        ("cache-control", "no-store"),
        ("content-security-policy", policy),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
    )


def _method_not_allowed() -> HttpResponse:
    return http_api.error_response(405, "method not allowed", headers=(("allow", "GET, HEAD"),))


def tank_js_response() -> HttpResponse:
    """``200`` with tank.js, ``text/javascript``, loadable from any origin."""
    return HttpResponse(
        status=200,
        headers=(
            ("content-type", JS_CONTENT_TYPE),
            ("cache-control", "no-cache"),
            ("access-control-allow-origin", "*"),
            ("x-content-type-options", "nosniff"),
        ),
        body=asset("tank.js"),
    )


def status_page_response() -> HttpResponse:
    """``200`` with the status page, ``text/html``, never cached, under a strict CSP."""
    return HttpResponse(status=200, headers=_status_page_headers(), body=asset("status.html"))


def page_access(
    headers: Headers, query: Query, peer_host: str, config: ServerConfig
) -> HttpResponse | None:
    """``None`` when the status page may be served, else the 401 or 403 answer (plain text).

    As ``http_api.check_access``, and with a key configured a ``apikey=KEY`` query parameter
    matching it also lets the request in.
    """
    if config.api_key is not None:
        expected = config.api_key.encode("utf-8", "surrogatepass")
        offered = [value for name, value in query if name == "apikey"]
        # Compare every candidate: no short-circuit on the secret.
        matches = [
            hmac.compare_digest(value.encode("utf-8", "surrogatepass"), expected)
            for value in offered
        ]
        if any(matches):
            return None
    denied = http_api.check_access(headers, peer_host, config)
    if denied is None:
        return None
    if denied.status == 401:
        message = (
            "401 Unauthorized: this server has an API key. Open this page as /?apikey=KEY "
            "or send 'Authorization: apikey KEY'.\n"
        )
        return http_api.text_response(401, message, headers=(("www-authenticate", "apikey"),))
    return http_api.text_response(
        denied.status,
        "403 Forbidden: without an API key the status page answers only loopback clients.\n",
    )


def route_static(
    *,
    method: str,
    path: str,
    query: Query,
    headers: Headers,
    peer_host: str,
    config: ServerConfig,
) -> HttpResponse | None:
    """The answer to a request for ``/tank.js`` or ``/``; ``None`` for any other path.

    ``headers`` have lowercase names (values decoded with latin-1); ``query`` is the URL-decoded
    query. Order for ``/``: 401/403, then 405 (GET and HEAD are served); ``/tank.js`` needs
    no access check.
    """
    path = path.partition("?")[0]
    if path == TANK_JS_PATH:
        if method not in _METHODS:
            return _method_not_allowed()
        return tank_js_response()
    if path == STATUS_PATH:
        denied = page_access(headers, query, peer_host, config)
        if denied is not None:
            return denied
        if method not in _METHODS:
            return _method_not_allowed()
        return status_page_response()
    return None
