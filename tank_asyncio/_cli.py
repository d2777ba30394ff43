"""``tank serve``: the standalone server (issue 3: exactly these options, each also ``TANK_<OPTION>``).

The command line wins over the environment. At start one line goes to stdout, flushed:
``tank: serving ws://HOST:PORT/PATH (backend NAME)`` with the real port. SIGINT and SIGTERM shut
down gracefully (PROTOCOL.md), then the exit status is 0. A bad option value is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, TypedDict

from tank_core import (
    ClientConnected,
    ClientDisconnected,
    ConfigError,
    ErrorOccurred,
    HeartbeatTimedOut,
    Notification,
    ServerConfig,
    SlowConsumerClosed,
)

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
BACKENDS = ("asyncio", "trio")
LOG_LEVELS = ("debug", "info", "warning")

logger = logging.getLogger("tank")
events_logger = logging.getLogger("tank.events")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``tank serve: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------- value parsers


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (want 0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (want 0-65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r} (want > 0)")
    return value


def _size(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want a number of bytes)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want > 0)")
    return value


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(choices)})"
            )
        return text

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (want 1/0, true/false, yes/no)")


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


# ---------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    kind: str = "value"  # "value", "flag" (store_true) or "append"

    @property
    def env(self) -> str:
        return "TANK_" + self.flag.removeprefix("--").replace("-", "_").upper()


OPTIONS: tuple[_Option, ...] = (
    _Option("--host", "host", _non_empty, "127.0.0.1", "address to listen on"),
    _Option("--port", "port", _port, 8080, "port to listen on; 0 picks a free port"),
    _Option("--path", "path", str, "/ws", "WebSocket path"),
    _Option("--backend", "backend", _choice(BACKENDS), "asyncio", "asyncio or trio",
            metavar="{asyncio,trio}"),
    _Option("--heartbeat-interval", "heartbeat_interval", _seconds, 5.0,
            "seconds between Pings (and text heartbeats)", metavar="SECONDS"),
    _Option("--heartbeat-timeout", "heartbeat_timeout", _seconds, 15.0,
            "seconds of silence before closing with 1011", metavar="SECONDS"),
    _Option("--close-timeout", "close_timeout", _seconds, 2.0,
            "seconds to wait for the peer's Close", metavar="SECONDS"),
    _Option("--no-text-heartbeat", "no_text_heartbeat", _flag, False,
            "do not send the text frame 'heartbeat'", kind="flag"),
    _Option("--no-relay", "no_relay", _flag, False,
            "do not relay client messages to the other clients", kind="flag"),
    _Option("--max-message-size", "max_message_size", _size, 1_048_576,
            "largest incoming message in bytes (1009 beyond)", metavar="BYTES"),
    _Option("--max-outbox-bytes", "max_outbox_bytes", _size, 4_194_304,
            "unsent bytes per connection before closing it 1008", metavar="BYTES"),
    _Option("--allowed-origin", "allowed_origin", _non_empty, None,
            "allow this Origin (repeatable; env: comma-separated); default any",
            metavar="ORIGIN", kind="append"),
    _Option("--api-key", "api_key", _non_empty, None,
            "require 'Authorization: apikey KEY' on /api/* and /metrics", metavar="KEY"),
    _Option("--log-level", "log_level", _choice(LOG_LEVELS), "info", "debug, info or warning",
            metavar="{debug,info,warning}"),
)


def _build_parser() -> _Parser:
    parser = _Parser(prog="tank", description="Tank for Python: WebSocket pub/sub server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    serve = commands.add_parser(
        "serve",
        help="serve WebSocket clients and the HTTP API",
        description="Serve WebSocket clients and the HTTP API. Each option can also be set with "
        "an environment variable TANK_<OPTION> (e.g. TANK_HEARTBEAT_INTERVAL=5, TANK_NO_RELAY=1, "
        "TANK_ALLOWED_ORIGIN=a,b); the command line wins.",
    )
    for option in OPTIONS:
        help_text = f"{option.help} (env {option.env})"
        if option.kind == "flag":
            serve.add_argument(option.flag, dest=option.dest, action="store_true", default=None,
                               help=help_text)
        elif option.kind == "append":
            serve.add_argument(option.flag, dest=option.dest, action="append", type=option.parse,
                               default=None, metavar=option.metavar, help=help_text)
        else:
            if option.default is not None:
                help_text += f"; default {option.default}"
            serve.add_argument(option.flag, dest=option.dest, type=option.parse, default=None,
                               metavar=option.metavar, help=help_text)
    return parser


@dataclass(frozen=True)
class Settings:
    config: ServerConfig
    host: str
    port: int
    backend: str
    log_level: str


def _resolve(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> Settings:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if value is None and option.env in environ:
            raw = environ[option.env]
            try:
                if option.kind == "append":
                    value = [option.parse(origin) for origin in _origins(raw)]
                else:
                    value = option.parse(raw)
            except argparse.ArgumentTypeError as exc:
                raise _UsageError(f"environment variable {option.env}: {exc}") from None
        if value is None:
            value = option.default
        values[option.dest] = value
    try:
        config = ServerConfig(
            path=values["path"],
            heartbeat_interval=values["heartbeat_interval"],
            heartbeat_timeout=values["heartbeat_timeout"],
            close_timeout=values["close_timeout"],
            text_heartbeat=not values["no_text_heartbeat"],
            relay=not values["no_relay"],
            max_message_size=values["max_message_size"],
            max_outbox_bytes=values["max_outbox_bytes"],
            allowed_origins=frozenset(values["allowed_origin"] or ()),
            api_key=values["api_key"],
        )
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    return Settings(
        config=config,
        host=values["host"],
        port=values["port"],
        backend=values["backend"],
        log_level=values["log_level"],
    )


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
    from ._server import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(settings.config, settings.host, settings.port,
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
        trio: Any = importlib.import_module("trio")
        tank_trio: Any = importlib.import_module("tank_trio")
    except ImportError as exc:
        raise _UsageError(f"--backend trio is not available: {exc}") from None
    serve_trio = getattr(tank_trio, "serve", None)
    if serve_trio is None:
        raise _UsageError("--backend trio is not available: tank_trio.serve is not implemented yet")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(serve_trio, settings.config, settings.host, settings.port,
                            **_hooks(settings.log_level))
                )
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    serve_parser_prog = f"{parser.prog} {args.command}"
    try:
        settings = _resolve(args, os.environ)
    except _UsageError as exc:
        print(f"{serve_parser_prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    _configure_logging(settings.log_level)
    try:
        if settings.backend == "trio":
            _run_trio(settings)
        else:
            _run_asyncio(settings)
    except _UsageError as exc:
        print(f"{serve_parser_prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (OSError, BaseExceptionGroup) as exc:
        error = _only_os_error(exc)
        if error is None:
            raise
        print(f"{serve_parser_prog}: error: cannot listen on {settings.host}:{settings.port}: "
              f"{error.strerror or error}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    return 0
