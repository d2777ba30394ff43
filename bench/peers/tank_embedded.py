#!/usr/bin/env python3
"""Our server for ``bench/server_bench.py``'s fan-out load: ``tank_asyncio.serve`` / ``tank_trio.serve``
embedded (docs/embedding.md) with the bench's publish trigger added through the ``on_message`` hook.

The three servers of the fan-out bench get the same trigger: a dedicated publisher WebSocket
connection sends ``pub:T:D`` and the server sends ``{"topic":T,"data":D}`` to every subscriber of T.
Here that is a plain (inline) ``on_message`` hook calling ``server.publish(T, D)``: the embedding API's
real publish path (render once, frame once, queue it on each subscriber's data lane), the same work ``POST
/api/publish`` does after its HTTP parsing. Relay is off, as the peers do not relay either (with relay
on, each ``pub:`` message would also be relayed to the 1,000 subscribers). Everything else is
``tank serve``'s defaults and code; asyncio runs on uvloop, as ``tank serve`` does.

``--heartbeat-interval 0`` pushes the heartbeat out of the measurement (interval 1e6 s): the peers
are run without pings for the fan-out too. ``--profile PATH`` runs the server under cProfile and
writes the stats to PATH on exit. Prints ``tank: serving ws://HOST:PORT/ws (backend NAME)`` once
listening; SIGTERM/SIGINT shut it down.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import signal
import sys
from typing import Any

from tank_core import Limits, ServerConfig
from tank_core.notifications import MessageReceived


def config(opts: argparse.Namespace) -> ServerConfig:
    interval = opts.heartbeat_interval or 1e6
    # The peers have no rate or per-address limits: ours are off, so all do the same work.
    limits = Limits(max_frames_per_second=None, max_input_bytes_per_second=None,
                    max_connections_per_address=None)
    return ServerConfig(relay=False, heartbeat_interval=interval, heartbeat_timeout=3 * interval,
                        limits=limits)


def make_hook(holder: list[Any]) -> Any:
    def on_message(event: MessageReceived) -> None:
        data = event.data
        if data.startswith(b"pub:"):
            topic, _, payload = data[4:].partition(b":")
            holder[0].publish(topic.decode(), payload.decode())

    return on_message


def announce(url: str, backend: str) -> None:
    sys.stdout.write(f"tank: serving {url} (backend {backend})\n")
    sys.stdout.flush()


async def run_asyncio(opts: argparse.Namespace) -> None:
    import tank_asyncio

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    holder: list[Any] = [None]
    async with tank_asyncio.serve(config(opts), opts.host, opts.port, on_message=make_hook(holder)) as server:
        holder[0] = server
        announce(server.url, "asyncio")
        await stop


async def run_trio(opts: argparse.Namespace) -> None:
    import trio

    import tank_trio

    holder: list[Any] = [None]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                tank_trio.serve, config(opts), opts.host, opts.port, on_message=make_hook(holder)))
            holder[0] = server
            announce(server.url, "trio")
            async for _signum in signals:
                break
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--heartbeat-interval", type=float, default=0.0, help="seconds; 0 = out of the way")
    parser.add_argument("--profile", default="", help="write cProfile stats to this path on exit")
    opts = parser.parse_args()
    profiler = cProfile.Profile() if opts.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        if opts.backend == "trio":
            import trio

            trio.run(run_trio, opts)
        else:
            try:
                import uvloop
            except ImportError:
                asyncio.run(run_asyncio(opts))
            else:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runner.run(run_asyncio(opts))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(opts.profile)


if __name__ == "__main__":
    main()
