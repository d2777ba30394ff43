#!/usr/bin/env python3
"""Our server as an ASGI application for ``bench/asgi_bench.py``: ``tank_asgi.TankASGI`` mounted in a
FastAPI application (``app.mount("/tank", tank)``, ``lifespan=tank.lifespan``, as docs/how-to/asgi.md
and examples/fastapi_app.py do), run by uvicorn on uvloop.

The fan-out trigger is ``bench/peers/tank_embedded.py``'s, imported from it: an inline ``on_message``
hook that turns ``pub:T:D`` into ``tank.publish(T, D)``, with the same configuration (relay off, the
heartbeat out of the way, rate and per-address limits off).

``--ws`` picks uvicorn's WebSocket implementation (``websockets-sansio``, uvicorn's default with
websockets installed; ``websockets``, the deprecated legacy one; ``wsproto``). uvicorn's own
protocol pings are off (``ws_ping_interval=None``) and nothing offers compression, so neither is in
the measurement. ``--mount ''`` runs ``TankASGI`` alone as the application, without FastAPI.
``--profile PATH`` runs the server under cProfile and writes the stats to PATH on exit. Prints
``tank: serving ws://HOST:PORT/tank/ws (uvicorn ...)`` once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tank_embedded import config, make_hook  # a sibling script: the same trigger and configuration

from tank_asgi import TankASGI


def build(opts: argparse.Namespace) -> Any:
    holder: list[Any] = [None]
    tank = TankASGI(config(opts), on_message=make_hook(holder))
    holder[0] = tank
    if not opts.mount:
        return tank
    from fastapi import FastAPI

    app = FastAPI(lifespan=tank.lifespan)
    app.mount(opts.mount, tank)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ws", default="websockets-sansio",
                        choices=("websockets-sansio", "websockets", "wsproto"),
                        help="uvicorn's WebSocket implementation")
    parser.add_argument("--mount", default="/tank", help="mount point in FastAPI; '' = TankASGI alone")
    parser.add_argument("--heartbeat-interval", type=float, default=0.0, help="seconds; 0 = out of the way")
    parser.add_argument("--profile", default="", help="write cProfile stats to this path on exit")
    opts = parser.parse_args()

    import uvicorn

    app = build(opts)
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, fd=sock.fileno(), loop="uvloop", http="h11", ws=opts.ws, ws_ping_interval=None,
        ws_per_message_deflate=False, lifespan="on", log_level="warning", access_log=False,
        timeout_graceful_shutdown=5))
    sys.stdout.write(f"tank: serving ws://{opts.host}:{port}{opts.mount}/ws (uvicorn, ws {opts.ws}, "
                     f"{'FastAPI mount ' + opts.mount if opts.mount else 'TankASGI alone'})\n")
    sys.stdout.flush()
    # uvicorn restores these once shut down and raises the signal it got again: a no-op handler lets
    # run() return (exit status 0, the profile written) instead of the default handler killing us.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    profiler = cProfile.Profile() if opts.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        server.run()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(opts.profile)


if __name__ == "__main__":
    main()
