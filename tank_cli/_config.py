"""``tank serve``'s options: each a flag or a ``TANK_<OPTION>`` environment variable, flag first.

``OPTIONS`` is the one table: flag, parser, default, help. ``add_serve_command`` turns it into the
``serve`` sub-command; ``resolve`` merges the parsed flags, the environment and the defaults into
``Settings`` (a checked ``ServerConfig`` plus what only the command line knows: host, port, backend,
log level), raising ``UsageError`` for a bad environment value or an inconsistent config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tank_core import BrokerConfig, ConfigError, ServerConfig
from tank_core.cluster.resp import require_hiredis

from ._args import UsageError, choice, flag, non_empty, origins, port, seconds, size

__all__ = ["BACKENDS", "LOG_LEVELS", "OPTIONS", "Option", "Settings", "add_serve_command", "resolve"]

BACKENDS = ("asyncio", "trio")
LOG_LEVELS = ("debug", "info", "warning")


@dataclass(frozen=True)
class Option:
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


OPTIONS: tuple[Option, ...] = (
    Option("--host", "host", non_empty, "127.0.0.1", "address to listen on"),
    Option("--port", "port", port, 8080, "port to listen on; 0 picks a free port"),
    Option("--path", "path", str, "/ws", "WebSocket path"),
    Option("--backend", "backend", choice(BACKENDS), "asyncio", "asyncio or trio",
           metavar="{asyncio,trio}"),
    Option("--heartbeat-interval", "heartbeat_interval", seconds, 5.0,
           "seconds between Pings (and text heartbeats)", metavar="SECONDS"),
    Option("--heartbeat-timeout", "heartbeat_timeout", seconds, 15.0,
           "seconds of silence before closing with 1011", metavar="SECONDS"),
    Option("--close-timeout", "close_timeout", seconds, 2.0,
           "seconds to wait for the peer's Close", metavar="SECONDS"),
    Option("--no-text-heartbeat", "no_text_heartbeat", flag, False,
           "do not send the text frame 'heartbeat'", kind="flag"),
    Option("--no-relay", "no_relay", flag, False,
           "do not relay client messages to the other clients", kind="flag"),
    Option("--max-message-size", "max_message_size", size, 1_048_576,
           "largest incoming message in bytes (1009 beyond)", metavar="BYTES"),
    Option("--max-outbox-bytes", "max_outbox_bytes", size, 4_194_304,
           "unsent bytes per connection before closing it 1008", metavar="BYTES"),
    Option("--allowed-origin", "allowed_origin", non_empty, None,
           "allow this Origin (repeatable; env: comma-separated); default any",
           metavar="ORIGIN", kind="append"),
    Option("--api-key", "api_key", non_empty, None,
           "require 'Authorization: apikey KEY' on /api/* and /metrics", metavar="KEY"),
    Option("--redis-url", "redis_url", non_empty, None,
           "be one node of a cluster sharing this Redis (docs/scale-out.md); default: one process",
           metavar="redis://HOST:PORT/DB"),
    Option("--log-level", "log_level", choice(LOG_LEVELS), "info", "debug, info or warning",
           metavar="{debug,info,warning}"),
)


def add_serve_command(commands: Any) -> None:
    """Add ``serve`` to ``commands`` (argparse's sub-parsers action): one flag per option.

    Every flag defaults to None, so that ``resolve`` can tell "not given" from "given"."""
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


@dataclass(frozen=True)
class Settings:
    config: ServerConfig
    host: str
    port: int
    backend: str
    log_level: str


def _value(option: Option, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    value = getattr(args, option.dest)
    if value is None and option.env in environ:
        raw = environ[option.env]
        try:
            if option.kind == "append":
                value = [option.parse(origin) for origin in origins(raw)]
            else:
                value = option.parse(raw)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"environment variable {option.env}: {exc}") from None
    return option.default if value is None else value


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The flags in ``args`` over ``environ``'s ``TANK_*`` over the defaults; ``UsageError`` if bad."""
    values = {option.dest: _value(option, args, environ) for option in OPTIONS}
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
            broker=None if values["redis_url"] is None else BrokerConfig.from_url(values["redis_url"]),
        )
        if config.broker is not None:
            require_hiredis()  # the `redis` extra: say so now, not as a traceback at start
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return Settings(
        config=config,
        host=values["host"],
        port=values["port"],
        backend=values["backend"],
        log_level=values["log_level"],
    )
