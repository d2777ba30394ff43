"""Who may use the HTTP API without a key: this machine, by a name of this machine, never a page.

With no API key the API answers loopback clients only (PROTOCOL.md). That alone is not enough:

- behind a reverse proxy on the same host every request comes from loopback, so a request from a
  ``trusted_proxies`` address counts as coming from the address the proxy forwarded
  (``forwarded_for``: the last ``X-Forwarded-For`` entry, the one the proxy itself added; entries
  before it are whatever the client claimed);
- a page on ``evil.example`` whose name resolves to 127.0.0.1 (DNS rebinding) reaches loopback
  with ``Host: evil.example``, so the Host must be an IP address, ``localhost`` or one of
  ``allowed_hosts`` (``host_allowed``);
- any page can make the browser POST a simple form (``text/plain``) to loopback, so a mutating
  call needs ``Content-Type: application/json``, which no page can send cross-site without a CORS
  preflight that we never grant, and an ``Origin``, when sent, of this very host
  (``cross_site_problem``).
"""

from __future__ import annotations

import ipaddress

__all__ = ["cross_site_problem", "forwarded_for", "has_forwarded_for", "host_allowed"]

Headers = tuple[tuple[str, str], ...]


def has_forwarded_for(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"x-forwarded-for" for name, _value in headers)


def forwarded_for(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client address a trusted proxy forwarded, or None when it sent none we can read."""
    values = [value for name, value in headers if name == b"x-forwarded-for"]
    if not values:
        return None
    last = values[-1].decode("latin-1").split(",")[-1].strip()
    if last.startswith("["):  # [v6] or [v6]:port
        last = last[1:].split("]", 1)[0]
    elif last.count(":") == 1:  # v4:port, as some gateways add it
        last = last.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None


def _host_name(value: str) -> str:
    """``Host`` without its port, lowercased; IPv6 literals without brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _header(headers: Headers, name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def host_allowed(headers: Headers, allowed_hosts: frozenset[str]) -> bool:
    """True when the request names this machine: an IP address, ``localhost`` or an allowed
    host (RFC 9110 §7.2: exactly one Host; HTTP/1.0 requests without one pass)."""
    hosts = _header(headers, "host")
    if not hosts:
        return True
    if len(hosts) > 1:
        return False
    name = _host_name(hosts[0])
    if name == "localhost" or name.endswith(".localhost") or name in allowed_hosts:
        return True
    if "*" in allowed_hosts:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cross_site_problem(headers: Headers, allowed_origins: frozenset[str]) -> tuple[int, str] | None:
    """Why a mutating API call without a key looks cross-site: (status, message), or None."""
    types = _header(headers, "content-type")
    media = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
    if media != "application/json":
        return 415, "send Content-Type: application/json (required without an API key)"
    origins = _header(headers, "origin")
    if not origins:
        return None  # not a browser, or a same-origin GET-style client: curl, tank pub
    origin = origins[0].strip()
    if origin in allowed_origins:
        return None
    hosts = _header(headers, "host")
    netloc = origin.split("://", 1)[1] if "://" in origin else ""
    if len(origins) == 1 and hosts and netloc.lower() == hosts[0].strip().lower():
        return None
    return 403, "cross-site request refused: the Origin is not this server"
