"""``tank serve``: run ``tank_asyncio.serve`` or ``tank_trio.serve`` until SIGINT, SIGTERM or SIGHUP.

At start one line goes to stdout, flushed: ``tank: serving ws://HOST:PORT/PATH (backend NAME)`` with
the real port (scripts and tests read it: its format does not change); and one record goes to the
log (stderr, time-stamped) that also says where the status page (``/``), the HTTP API
(``/api/...``) and ``/metrics`` are. SIGINT, SIGTERM and SIGHUP shut down gracefully (Close 1001 to
everyone, PROTOCOL.md), then the exit status is 0. A bad option value is one line on stderr and exit
status 2; an address that cannot be listened on is one line and exit status 1.

The log (``--log-format text`` or ``json``: ``_logs.py``): at ``info``, logger ``tank.events`` has
one record per connection and per disconnection (with the close code and reason), per heartbeat
timeout, slow consumer and error, through the ``on_connect``, ``on_disconnect`` and ``on_error``
hooks (never a hook per message); a read or write error (a reset peer, a protocol error) is at
``debug``, since the disconnection record says it already. ``debug`` adds every notification
(``on_event``) and every frame (``tank.frames``); ``warning`` keeps only warnings and errors.
asyncio runs on uvloop when it is installed; trio is an optional extra, imported only for
``--backend trio``.
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
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
    Notification,
    SlowConsumerClosed,
)

from . import _logs
from ._args import EXIT_FAILURE, EXIT_USAGE, UsageError, print_error
from ._config import Settings, resolve

__all__ = ["SIGNALS", "main_serve", "where"]

logger = logging.getLogger("tank")
events_logger = logging.getLogger("tank.events")

#: The signals that shut the server down gracefully.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Errors the disconnection record tells already (code 1006 or 1002..., and the error): at debug, so
#: that a churn of reset connections is not one more line each.
_QUIET_ERRORS = frozenset({ErrorCode.READ_ERROR, ErrorCode.WRITE_ERROR})


# ---------------------------------------------------------------------- logging hooks


def _log_event(event: Notification) -> None:
    match event:
        case ClientConnected():
            events_logger.info(
                "conn %d connected: user %r from %s", event.conn_id, event.user_id, event.peer_host,
                extra={"event": "connected", "conn_id": event.conn_id, "user_id": event.user_id,
                       "peer": event.peer_host},
            )
        case ClientDisconnected():
            events_logger.info(
                "conn %d disconnected: user %r, code %d %r", event.conn_id, event.user_id,
                event.code, event.reason,
                extra={"event": "disconnected", "conn_id": event.conn_id, "user_id": event.user_id,
                       "code": event.code, "reason": event.reason},
            )
        case HeartbeatTimedOut():
            events_logger.info(
                "conn %d (user %r) silent for %.3f s: closing 1011", event.conn_id, event.user_id,
                event.silent_for,
                extra={"event": "heartbeat_timeout", "conn_id": event.conn_id,
                       "user_id": event.user_id, "silent_for": event.silent_for},
            )
        case SlowConsumerClosed():
            events_logger.info(
                "conn %d (user %r) is a slow consumer (%d bytes unsent): closing 1008",
                event.conn_id, event.user_id, event.outbox_bytes,
                extra={"event": "slow_consumer", "conn_id": event.conn_id,
                       "user_id": event.user_id, "outbox_bytes": event.outbox_bytes},
            )
        case ErrorOccurred():
            events_logger.log(
                logging.DEBUG if event.code in _QUIET_ERRORS else logging.INFO,
                "error %d: %s (conn %s, user %r)", int(event.code), event.message, event.conn_id,
                event.user_id,
                extra={"event": "error", "error_code": int(event.code), "conn_id": event.conn_id,
                       "user_id": event.user_id},
            )
        case _:
            events_logger.debug("%r", event)


class _LogHooks(TypedDict, total=False):
    on_event: Callable[[Any], object]
    on_connect: Callable[[Any], object]
    on_disconnect: Callable[[Any], object]
    on_error: Callable[[Any], object]


def _hooks(level: str) -> _LogHooks:
    if level == "warning":
        return {}
    if level == "debug":
        return {"on_event": _log_event}
    # info: what an operator wants to see, with a call per connection, never one per message.
    return {"on_connect": _log_event, "on_disconnect": _log_event, "on_error": _log_event}


def where(url: str) -> dict[str, str | None]:
    """Where ``tank serve`` with WebSocket ``url`` answers: the WebSocket ``url``, the status page
    (None when the WebSocket path is ``/``: the WebSocket wins there), the HTTP API, ``/metrics``."""
    scheme, rest = url.split("://", 1)
    authority, _, path = rest.partition("/")
    base = f"{'https' if scheme == 'wss' else 'http'}://{authority}"
    return {
        "url": url,
        "status_page": None if path == "" else base + "/",
        "api": base + "/api/",
        "metrics": base + "/metrics",
    }


def _announce(url: str, backend: str) -> None:
    sys.stdout.write(f"tank: serving {url} (backend {backend})\n")
    sys.stdout.flush()
    places = where(url)
    logger.info(
        "serving %s (backend %s); status page %s, API %s (publish, broadcast, disconnect, stats), "
        "metrics %s", url, backend, places["status_page"] or "none (the WebSocket path is /)",
        places["api"], places["metrics"],
        extra={"event": "serving", "backend": backend, **places},
    )


def _shutting_down(signum: signal.Signals | None) -> None:
    if signum is None:
        logger.info("shutting down", extra={"event": "shutting_down"})
    else:
        logger.info("shutting down (%s)", signum.name,
                    extra={"event": "shutting_down", "signal": signum.name})


# ---------------------------------------------------------------------- backends


async def _serve_asyncio(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        stop.set()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    async with tank_asyncio.serve(settings.config, settings.host, settings.port,
                                  ssl=settings.ssl, **_hooks(settings.log_level)) as server:
        _announce(server.url, "asyncio")
        stopping = loop.create_task(stop.wait())
        closed = loop.create_task(server.wait_closed())
        await asyncio.wait({stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        closed.cancel()
        _shutting_down(received[0] if received else None)
    logger.info("stopped", extra={"event": "stopped"})


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
        with trio.open_signal_receiver(*SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                server = await tank_trio.serve_in(nursery, settings.config, settings.host,
                                                  settings.port, ssl=settings.ssl,
                                                  **_hooks(settings.log_level))
                _announce(server.url, "trio")
                async for signum in signals:
                    _shutting_down(signal.Signals(signum))
                    break
                await server.shutdown()
                nursery.cancel_scope.cancel()
        logger.info("stopped", extra={"event": "stopped"})

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
    _logs.configure(settings.log_level, settings.log_format)
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
