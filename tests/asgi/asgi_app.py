"""The application the ASGI suite runs: FastAPI with ``TankASGI`` mounted at ``/tank`` (``http=True``),
under uvicorn, hypercorn (asyncio) or hypercorn on trio.

    python tests/asgi/asgi_app.py --server hypercorn-trio --heartbeat-interval 0.2 \
        --heartbeat-timeout 0.6 --close-silent --max-outbox-bytes 262144

It binds its own listening socket (port 0 by default) and hands its fd to the ASGI server through
``examples/fastapi_app.py``'s ``serve()`` (imported, not copied), after printing its URL on the first
line of stdout: ``tank: serving ws://127.0.0.1:PORT/tank/ws (SERVER)``. SIGINT/SIGTERM stop it.

Besides Tank, the application has one route of its own, ``GET /app/ping`` (FastAPI answers it,
not Tank), and the same Tank mounted a second time at ``/bare`` behind a wrapper that hides the
ASGI WebSocket denial-response extension from it (as a server without the extension would). Its
``authenticate`` hook refuses ``?token=bad`` (401) and ``?token=teapot`` (418), reading the token
from the ASGI scope through Starlette, and refuses everything unless it is given an
``AsgiUpgradeRequest`` carrying the connection's ASGI WebSocket scope.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

from fastapi_app import listen, serve  # noqa: E402 - examples/ is put on the path just above

from tank_asgi import AsgiUpgradeRequest, TankASGI  # noqa: E402
from tank_core import ServerConfig  # noqa: E402

SERVERS = ("uvicorn", "hypercorn", "hypercorn-trio")


def authenticate(request: AsgiUpgradeRequest) -> bool | int:
    """Refuse ``?token=bad`` (401) and ``?token=teapot`` (418), read from the ASGI scope through
    Starlette; refuse everything when the hook is not given the WebSocket's ASGI scope."""
    if not isinstance(request, AsgiUpgradeRequest) or request.scope.get("type") != "websocket":
        return False
    token = HTTPConnection(request.scope).query_params.get("token")
    if token != request.query_value("token"):
        return False
    if token == "bad":
        return False
    if token == "teapot":
        return 418
    return True


def build(args: argparse.Namespace) -> FastAPI:
    config = ServerConfig(
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        close_timeout=args.close_timeout,
        relay=not args.no_relay,
        max_message_size=args.max_message_size,
        max_outbox_bytes=args.max_outbox_bytes,
    )
    tank = TankASGI(
        config, authenticate=authenticate, http=True, redis_url=args.redis_url,
        close_silent=args.close_silent,
    )
    app = FastAPI(lifespan=tank.lifespan)
    app.mount("/tank", tank)

    async def without_denial_response(scope: Scope, receive: Receive, send: Send) -> None:
        """Tank as under an ASGI server without the WebSocket denial-response extension."""
        extensions = dict(scope.get("extensions") or {})
        extensions.pop("websocket.http.response", None)
        await tank({**scope, "extensions": extensions}, receive, send)

    app.mount("/bare", without_denial_response)

    @app.get("/app/ping")
    async def ping() -> dict[str, object]:
        return {"pong": True, "tank_running": tank.running}

    return app


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=float, default=0.2)
    parser.add_argument("--heartbeat-timeout", type=float, default=0.6)
    parser.add_argument("--close-timeout", type=float, default=0.5)
    parser.add_argument("--close-silent", action="store_true")
    parser.add_argument("--no-relay", action="store_true")
    parser.add_argument("--max-message-size", type=int, default=1_048_576)
    parser.add_argument("--max-outbox-bytes", type=int, default=4_194_304)
    parser.add_argument("--redis-url", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    app = build(args)
    serve(app, args.server, listen(args.host, args.port, args.server))


if __name__ == "__main__":
    main()
