"""An ASGI scope as the HTTP/1.1 request the core reads: the core's own HTTP layer then decides
(the path, the Origin, the user id, authentication, the limits, the API), exactly as for a socket.

The ASGI server has parsed the request and, for a WebSocket, done the handshake: what is rebuilt
here is the request line, the headers as they came (the path made relative to where the
application is mounted), and for a WebSocket the upgrade headers the core checks, since an ASGI
server may keep them to itself (RFC 8441 over HTTP/2 has none).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

__all__ = ["client_host", "request_bytes"]

#: Headers rebuilt here, whatever the scope says.
_REBUILT = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"sec-websocket-key",
     b"sec-websocket-version", b"sec-websocket-extensions"}
)
#: Characters left as they are in the path: RFC 3986 pchar and "/".
_PATH_SAFE = "/:@!$&'()*+,;="


def client_host(scope: Mapping[str, Any]) -> str:
    """The peer's address as the ASGI server saw it (before any proxy rules of the core)."""
    client = scope.get("client")
    if client and client[0]:
        return str(client[0])
    return "unknown"


def _local_path(scope: Mapping[str, Any]) -> str:
    """The path below the mount point: Starlette's ``Mount`` keeps the full path in ``path`` and
    the mount point in ``root_path``; other servers give the path below it."""
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path if path.startswith("/") else "/" + path


def request_bytes(scope: Mapping[str, Any], body: bytes = b"") -> bytes:
    """The request of an ``http`` or ``websocket`` scope, as HTTP/1.1 bytes with ``body``."""
    websocket = scope.get("type") == "websocket"
    method = "GET" if websocket else str(scope.get("method") or "GET")
    target = quote(_local_path(scope), safe=_PATH_SAFE)
    query = scope.get("query_string") or b""
    if query:
        target += "?" + bytes(query).decode("latin-1")
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    has_host = False
    for name, value in headers:
        lower = bytes(name).lower()
        if lower in _REBUILT:
            continue
        has_host = has_host or lower == b"host"
        lines.append(bytes(name) + b": " + bytes(value))
    if not has_host:
        server = scope.get("server")
        lines.append(b"host: " + (str(server[0]).encode("latin-1") if server else b"localhost"))
    if websocket:
        key = base64.b64encode(os.urandom(16))  # checked for form only: the handshake is done
        lines += [b"upgrade: websocket", b"connection: Upgrade", b"sec-websocket-version: 13",
                  b"sec-websocket-key: " + key]
    else:
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
