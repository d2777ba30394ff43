#!/usr/bin/env python3
"""python-socketio's ASGI application for ``bench/asgi_bench.py``'s fan-out: ``socketio.AsyncServer(
async_mode="asgi")`` wrapped in ``socketio.ASGIApp``, run by uvicorn on uvloop, as its docs show.

The same fan-out as our servers', the Socket.IO way: each subscriber emits ``join`` with the room
name and the server puts it in that room (``sio.enter_room``); the publisher connection emits
``pub`` with (room, data) and the handler does ``await sio.emit("message", data, room=room)``, which
python-socketio encodes once and sends to every member (``42["message",data]``). Everything else is
the library's defaults (``async_handlers=True``: each event handler runs as its own task), except
that the Engine.IO pings are pushed out of the measurement (every 3,600 s; our servers and the load
send none either), and uvicorn's own WebSocket pings are off.

``--ws`` picks uvicorn's WebSocket implementation, as ``tank_asgi_app.py``'s. ``--profile PATH``
runs the server under cProfile and writes the stats to PATH on exit. Prints ``socketio: serving
ws://HOST:PORT/socket.io/ (uvicorn ...)`` once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import socket
import sys
from typing import Any

#: Engine.IO ping interval and timeout (seconds): far past any bench run.
PING_INTERVAL = 3600


def build() -> Any:
    import socketio

    sio = socketio.AsyncServer(async_mode="asgi", ping_interval=PING_INTERVAL, ping_timeout=PING_INTERVAL,
                               logger=False, engineio_logger=False)

    @sio.on("join")  # type: ignore[misc]
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, room)

    @sio.on("pub")  # type: ignore[misc]
    async def pub(sid: str, room: str, data: str) -> None:
        await sio.emit("message", data, room=room)

    return socketio.ASGIApp(sio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ws", default="websockets-sansio",
                        choices=("websockets-sansio", "websockets", "wsproto"),
                        help="uvicorn's WebSocket implementation")
    parser.add_argument("--profile", default="", help="write cProfile stats to this path on exit")
    opts = parser.parse_args()

    import uvicorn

    app = build()
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, fd=sock.fileno(), loop="uvloop", http="h11", ws=opts.ws, ws_ping_interval=None,
        ws_per_message_deflate=False, lifespan="on", log_level="warning", access_log=False,
        timeout_graceful_shutdown=5))
    sys.stdout.write(f"socketio: serving ws://{opts.host}:{port}/socket.io/ (uvicorn, ws {opts.ws})\n")
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
