"""``tank serve``: run ``tank_asyncio.serve`` or ``tank_trio.serve`` until SIGINT or SIGTERM.

At start one line goes to stdout, flushed: ``tank: serving ws://HOST:PORT/PATH (backend NAME)`` with
the real port. SIGINT and SIGTERM shut down gracefully (PROTOCOL.md), then the exit status is 0. A
bad option value is one line on stderr and exit status 2; an address that cannot be listened on is
one line and exit status 1. The log level picks which core notifications reach logger
``tank.events``: ``debug`` all of them, ``info`` the errors, ``warning`` none. asyncio runs on uvloop
when it is installed; trio is an optional extra, imported only for ``--backend trio``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypedDict

import tank_asyncio
from tank_core.notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorOccurred,
    HeartbeatTimedOut,
    Notification,
    SlowConsumerClosed,
)

from ._args import EXIT_FAILURE, EXIT_USAGE, UsageError, print_error
from ._config import Settings, resolve

__all__ = ["main_serve"]

logger = logging.getLogger("tank")
events_logger = logging.getLogger("tank.events")


# ---------------------------------------------------------------------- logging hooks


def _log_event(event: Notification) -> None:
    match event:
        case ClientConnected():
            events_logger.debug("conn %d connected: user %r from %s", event.conn_id,
                                event.user_id, event.peer_host)
        case ClientDisconnected():
            events_logger.debug("conn %d disconnected: user %r, code %d %r", event.conn_id,
                                event.user_id, event.code, event.reason)
        case HeartbeatTimedOut():
            events_logger.info("conn %d (user %r) silent for %.3f s: closing 1011",
                               event.conn_id, event.user_id, event.silent_for)
        case SlowConsumerClosed():
            events_logger.info("conn %d (user %r) is a slow consumer (%d bytes unsent): closing 1008",
                               event.conn_id, event.user_id, event.outbox_bytes)
        case ErrorOccurred():
            events_logger.info("error %d: %s (conn %s, user %r)", int(event.code), event.message,
                               event.conn_id, event.user_id)
        case _:
            events_logger.debug("%r", event)


class _LogHooks(TypedDict, total=False):
    on_event: Callable[[Any], object]
    on_error: Callable[[Any], object]


def _hooks(level: str) -> _LogHooks:
    if level == "warning":
        return {}
    if level == "debug":
        return {"on_event": _log_event}
    # info: the events an operator wants to see, without a call per message.
    return {"on_error": _log_event}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level={"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _announce(url: str, backend: str) -> None:
    sys.stdout.write(f"tank: serving {url} (backend {backend})\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- backends


async def _serve_asyncio(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with tank_asyncio.serve(settings.config, settings.host, settings.port,
                                  **_hooks(settings.log_level)) as server:
        _announce(server.url, "asyncio")
        stopping = loop.create_task(stop.wait())
        closed = loop.create_task(server.wait_closed())
        await asyncio.wait({stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        closed.cancel()
        logger.info("shutting down")
    logger.info("stopped")


def _run_asyncio(settings: Settings) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_asyncio(settings))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_asyncio(settings))


def _run_trio(settings: Settings) -> None:
    try:
        import trio

        import tank_trio
    except ImportError as exc:  # the `trio` extra is not installed
        raise UsageError(f"--backend trio is not available: {exc}") from None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                server = await tank_trio.serve_in(nursery, settings.config, settings.host,
                                                  settings.port, **_hooks(settings.log_level))
                _announce(server.url, "trio")
                async for _signum in signals:
                    break
                logger.info("shutting down")
                await server.shutdown()
                nursery.cancel_scope.cancel()
        logger.info("stopped")

    trio.run(main)


def _only_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, unwrapping trio's single-exception groups; else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


def main_serve(args: argparse.Namespace, prog: str) -> int:
    """Run ``tank serve`` with the parsed ``args``; the exit status. ``prog`` prefixes errors."""
    try:
        settings = resolve(args, os.environ)
    except UsageError as exc:
        print_error(prog, str(exc))
        return EXIT_USAGE
    _configure_logging(settings.log_level)
    try:
        if settings.backend == "trio":
            _run_trio(settings)
        else:
            _run_asyncio(settings)
    except UsageError as exc:
        print_error(prog, str(exc))
        return EXIT_USAGE
    except (OSError, BaseExceptionGroup) as exc:
        error = _only_os_error(exc)
        if error is None:
            raise
        print_error(prog, f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    return 0
