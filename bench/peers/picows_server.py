#!/usr/bin/env python3
"""Peer for ``bench/server_bench.py``: the minimum of the Tank protocol on picows (Cython).

What the bench's load needs, and nothing more (``../shared/PROTOCOL.md``):

- the first frame on every connection is ``Hello, <id>! Welcome to WebSocket server.`` (``<id>`` is the
  ``user_id`` query parameter, else ``client_<n>``);
- ``sub:T`` / ``unsub:T`` subscribe and unsubscribe the connection;
- ``pub:T:D`` (the bench's trigger, sent on a dedicated publisher connection) renders
  ``{"topic":T,"data":D}`` once, as bytes, and calls ``transport.send(TEXT, ...)`` for each subscriber
  of T (picows frames and writes in Cython; one frame and one write per subscriber);
- anything else is ignored, unless ``--relay`` is given: then it is sent as it came (same opcode)
  to every other connection, never the sender, as Tank's relay does (``bench/rate_relay_bench.py``).

Pings: ``--ping-interval S`` turns on picows's auto-ping, ``PING_PERIODICALLY``, one Ping every S
seconds (a Pong is due within S/2); 0 turns it off. picows answers client pings itself
(``enable_auto_pong``). Everything else is picows's defaults (16 KiB initial read buffer per
connection). Runs on uvloop when it is installed, as our asyncio server does. Prints
``picows: serving ws://HOST:PORT/ws`` once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
from urllib.parse import parse_qs, urlsplit

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

_ids = itertools.count(1)
topics: dict[bytes, set[WSTransport]] = {}
#: With ``--relay``: every open connection (None: relay off).
relay_to: set[WSTransport] | None = None
TEXT = WSMsgType.TEXT


def render(topic: str, data: str) -> bytes:
    """``{"topic":T,"data":D}``, compact, ``topic`` first (as Tank renders it)."""
    return ('{"topic":' + json.dumps(topic) + ',"data":' + json.dumps(data) + "}").encode()


class TankListener(WSListener):  # type: ignore[misc]
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.mine: set[bytes] = set()

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(TEXT, f"Hello, {self.user_id}! Welcome to WebSocket server.".encode())
        if relay_to is not None:
            relay_to.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is TEXT or kind is WSMsgType.BINARY:
            text = frame.get_payload_as_bytes()
            if text.startswith(b"sub:"):
                topic = text[4:]
                topics.setdefault(topic, set()).add(transport)
                self.mine.add(topic)
            elif text.startswith(b"unsub:"):
                topic = text[6:]
                subscribers = topics.get(topic)
                if subscribers is not None:
                    subscribers.discard(transport)
                    if not subscribers:
                        del topics[topic]
                self.mine.discard(topic)
            elif text.startswith(b"pub:"):
                topic, _, data = text[4:].partition(b":")
                subscribers = topics.get(topic)
                if subscribers:
                    payload = render(topic.decode(), data.decode())
                    send = TEXT
                    for sub in subscribers:
                        sub.send(send, payload)
            elif relay_to is not None:
                for other in relay_to:
                    if other is not transport:
                        other.send(kind, text)
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if relay_to is not None:
            relay_to.discard(transport)
        for topic in self.mine:
            subscribers = topics.get(topic)
            if subscribers is not None:
                subscribers.discard(transport)
                if not subscribers:
                    del topics[topic]
        self.mine.clear()


def factory(request: WSUpgradeRequest) -> TankListener:
    values = parse_qs(urlsplit(request.path.decode("latin-1")).query).get("user_id")
    return TankListener(values[0] if values and values[0] else f"client_{next(_ids)}")


async def main(opts: argparse.Namespace) -> None:
    global relay_to
    if opts.relay:
        relay_to = set()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    interval = opts.ping_interval
    ping: dict[str, object] = {}
    if interval:
        # picows's auto-ping task sleeps idle_timeout, pings, sleeps reply_timeout, checks the Pong,
        # and loops (and wants reply_timeout <= idle_timeout): half and half is one Ping per interval.
        ping = {
            "enable_auto_ping": True,
            "auto_ping_idle_timeout": interval / 2,
            "auto_ping_reply_timeout": interval / 2,
            "auto_ping_strategy": WSAutoPingStrategy.PING_PERIODICALLY,
        }
    server = await ws_create_server(factory, opts.host, opts.port, backlog=opts.backlog, **ping)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"picows: serving ws://{opts.host}:{port}/ws\n")
    sys.stdout.flush()
    try:
        await stop
    finally:
        server.close()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ping-interval", type=float, default=0.0, help="seconds; 0 = no pings")
    parser.add_argument("--relay", action="store_true",
                        help="send other messages on to every other connection (Tank's relay)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (Tank's is 4096)")
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
