"""Tank mounted in a FastAPI application: REST routes and pub/sub WebSockets on one port, one token
check for both.

    python examples/fastapi_app.py                            # uvicorn on 127.0.0.1:8000
    python examples/fastapi_app.py --server hypercorn-trio    # hypercorn on trio
    python examples/fastapi_app.py --redis-url redis://127.0.0.1:6379/0   # one node of a cluster
    cd examples && uvicorn fastapi_app:app                    # the ASGI server's own command line

Clients connect to ``ws://HOST:PORT/tank/ws?user_id=alice&token=t-alice``; ``POST /notes`` (with
``Authorization: Bearer t-alice``) publishes to the ``notes`` topic; the Tank HTTP API answers under
``/tank/api/`` (loopback callers only, as with ``tank serve``). docs/how-to/asgi.md walks through it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import socket

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from tank_asgi import AsgiUpgradeRequest, TankASGI
from tank_core import ServerConfig

TOKENS = {"t-alice": "alice", "t-bob": "bob"}  # token -> user id: your session store


def user_of(connection: HTTPConnection) -> str | None:
    """The application's one check: a bearer token, or ``?token=`` where headers cannot be set
    (a browser's WebSocket)."""
    header = connection.headers.get("authorization", "")
    token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
    return TOKENS.get(token or connection.query_params.get("token") or "")


class Note(BaseModel):
    text: str


def current_user(request: Request) -> str:
    """The check as a FastAPI dependency, for the REST routes."""
    user = user_of(request)
    if user is None:
        raise HTTPException(status_code=401, detail="unknown token")
    return user


def authenticate(request: AsgiUpgradeRequest) -> bool:
    """The same check for WebSocket upgrades: Tank gives the ASGI scope with the request."""
    user = user_of(HTTPConnection(request.scope))
    return user is not None and user == request.user_id


def build(redis_url: str | None = None) -> tuple[FastAPI, TankASGI]:
    tank = TankASGI(ServerConfig(), authenticate=authenticate, http=True, redis_url=redis_url)
    app = FastAPI(lifespan=tank.lifespan)  # Tank runs while the application does
    app.mount("/tank", tank)

    @app.post("/notes")
    async def post_note(note: Note, user: str = Depends(current_user)) -> dict[str, int]:
        # async def: the route runs on the event loop, where Tank's methods are to be called
        return {"delivered": tank.publish("notes", f"{user}: {note.text}")}

    return app, tank


#: For ``uvicorn fastapi_app:app`` and ``hypercorn fastapi_app:app`` (run from examples/).
app, tank = build(os.environ.get("TANK_REDIS_URL"))


def serve(app: FastAPI, server: str, sock: socket.socket) -> None:
    """Run ``app`` on the listening ``sock`` with the chosen ASGI server, until SIGINT/SIGTERM."""
    if server == "uvicorn":
        import uvicorn

        # uvicorn stops on SIGINT or SIGTERM, then raises the signal again under the handler it
        # found: KeyboardInterrupt for SIGINT, and with the default handler SIGTERM would kill
        # the process instead of letting it exit 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        return
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    if server == "hypercorn":
        from hypercorn.asyncio import serve as hypercorn_asyncio

        asyncio.run(hypercorn_asyncio(app, config))  # type: ignore[arg-type]
    else:
        import trio
        from hypercorn.trio import serve as hypercorn_trio

        async def signalled() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

        trio.run(functools.partial(
            hypercorn_trio, app, config, shutdown_trigger=signalled  # type: ignore[arg-type]
        ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("uvicorn", "hypercorn", "hypercorn-trio"),
                        default="uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    application = app if args.redis_url is None else build(args.redis_url)[0]
    serve(application, args.server, listen(args.host, args.port, args.server))


def listen(host: str, port: int, server: str) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free one), announced on stdout."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    print(f"tank: serving ws://{host}:{sock.getsockname()[1]}/tank/ws ({server})", flush=True)
    return sock


if __name__ == "__main__":
    main()
