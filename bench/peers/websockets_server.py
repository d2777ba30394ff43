#!/usr/bin/env python3
"""Peer for ``bench/server_bench.py``: the minimum of the Tank protocol on the ``websockets`` library.

What the bench's load needs, and nothing more (``../shared/PROTOCOL.md``):

- the first frame on every connection is ``Hello, <id>! Welcome to WebSocket server.`` (``<id>`` is the
  ``user_id`` query parameter, else ``client_<n>``);
- ``sub:T`` / ``unsub:T`` subscribe and unsubscribe the connection;
- ``pub:T:D`` (the bench's trigger, sent on a dedicated publisher connection) renders
  ``{"topic":T,"data":D}`` once and sends it to every subscriber of T with ``websockets.broadcast``
  (the library's fan-out primitive: one encode, one frame per connection, no backpressure);
- anything else is ignored (no relay: the load never sends application messages).

Pings: ``--ping-interval S`` turns on the library's keepalive (``ping_interval=S``, ``ping_timeout=3*S``,
Tank's default timeout ratio); 0 turns it off. No compression unless ``--compression`` (for
``compression_bench.py``). Runs on uvloop when it is installed, as our asyncio server does.
Prints ``websockets: serving ws://HOST:PORT/ws`` once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve

_ids = itertools.count(1)
topics: dict[str, set[ServerConnection]] = {}


def render(topic: str, data: str) -> str:
    """``{"topic":T,"data":D}``, compact, ``topic`` first (as Tank renders it)."""
    return '{"topic":' + json.dumps(topic) + ',"data":' + json.dumps(data) + "}"


def client_id(path: str) -> str:
    values = parse_qs(urlsplit(path).query).get("user_id")
    return values[0] if values and values[0] else f"client_{next(_ids)}"


async def handler(ws: ServerConnection) -> None:
    mine: set[str] = set()
    try:
        user_id = client_id(ws.request.path if ws.request else "")
        await ws.send(f"Hello, {user_id}! Welcome to WebSocket server.")
        async for message in ws:
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            if text.startswith("sub:"):
                topic = text[4:]
                topics.setdefault(topic, set()).add(ws)
                mine.add(topic)
            elif text.startswith("unsub:"):
                topic = text[6:]
                subscribers = topics.get(topic)
                if subscribers is not None:
                    subscribers.discard(ws)
                    if not subscribers:
                        del topics[topic]
                mine.discard(topic)
            elif text.startswith("pub:"):
                topic, _, data = text[4:].partition(":")
                subscribers = topics.get(topic)
                if subscribers:
                    broadcast(subscribers, render(topic, data))
    finally:
        for topic in mine:
            subscribers = topics.get(topic)
            if subscribers is not None:
                subscribers.discard(ws)
                if not subscribers:
                    del topics[topic]


async def main(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    interval = opts.ping_interval or None
    async with serve(
        handler,
        opts.host,
        opts.port,
        ping_interval=interval,
        ping_timeout=3 * interval if interval else None,
        compression="deflate" if opts.compression else None,
        max_size=1_048_576,
        backlog=opts.backlog,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        sys.stdout.write(f"websockets: serving ws://{opts.host}:{port}/ws\n")
        sys.stdout.flush()
        await stop


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ping-interval", type=float, default=0.0, help="seconds; 0 = no pings")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (Tank's is 4096)")
    parser.add_argument("--compression", action="store_true",
                        help="agree permessage-deflate with the library's defaults "
                             "(compression=\"deflate\"); default: no compression")
    opts = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(opts))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main(opts))


if __name__ == "__main__":
    run()
