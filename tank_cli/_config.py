"""``tank serve``'s options: each a flag or a ``TANK_<OPTION>`` environment variable, flag first.

``OPTIONS`` is the one table: flag, parser, default, help. ``add_serve_command`` turns it into the
``serve`` sub-command; ``resolve`` merges the parsed flags, the environment and the defaults into
``Settings`` (a checked ``ServerConfig`` plus what only the command line knows: host, port, backend,
log level and format), raising ``UsageError`` for a bad environment value or an inconsistent config.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tank_core import BrokerConfig, ConfigError, History, HistoryPolicy, Limits, ServerConfig
from tank_core.cluster.resp import require_hiredis

from ._args import (
    OFF,
    UsageError,
    byte_count,
    choice,
    flag,
    non_empty,
    or_off,
    origins,
    port,
    rate,
    seconds,
    size,
)

__all__ = [
    "BACKENDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OPTIONS",
    "Option",
    "Settings",
    "add_serve_command",
    "resolve",
]

BACKENDS = ("asyncio", "trio")
LOG_LEVELS = ("debug", "info", "warning")
LOG_FORMATS = ("text", "json")


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
    Option("--no-compression", "no_compression", flag, False,
           "decline permessage-deflate (on by default for clients that offer it)", kind="flag"),
    Option("--compression-threshold", "compression_threshold", byte_count, 128,
           "messages shorter than this go uncompressed", metavar="BYTES"),
    Option("--history-size", "history_size", or_off(size), OFF,
           "keep the last N publications of every topic, numbered (GET /api/history); "
           "default off", metavar="N|off"),
    Option("--history-ttl", "history_ttl", seconds, 300.0,
           "seconds a publication stays in the history", metavar="SECONDS"),
    Option("--max-message-size", "max_message_size", size, 1_048_576,
           "largest incoming message in bytes (1009 beyond)", metavar="BYTES"),
    Option("--max-outbox-bytes", "max_outbox_bytes", size, 4_194_304,
           "unsent bytes per connection before closing it 1008", metavar="BYTES"),
    Option("--allowed-origin", "allowed_origin", non_empty, None,
           "allow this Origin (repeatable; env: comma-separated); default any",
           metavar="ORIGIN", kind="append"),
    Option("--trusted-proxy", "trusted_proxy", non_empty, None,
           "believe X-Forwarded-For from this address (a reverse proxy; repeatable; env: "
           "comma-separated)", metavar="ADDRESS", kind="append"),
    Option("--allowed-host", "allowed_host", non_empty, None,
           "a Host name the API answers to without a key, besides IP addresses and localhost "
           "(repeatable; env: comma-separated)", metavar="NAME", kind="append"),
    Option("--certfile", "certfile", non_empty, None,
           "serve wss:// (and the API over HTTPS) with this PEM certificate chain", metavar="PATH"),
    Option("--keyfile", "keyfile", non_empty, None,
           "the certificate's private key (PEM), when --certfile does not hold it", metavar="PATH"),
    Option("--api-key", "api_key", non_empty, None,
           "require 'Authorization: apikey KEY' on /api/* and /metrics", metavar="KEY"),
    Option("--redis-url", "redis_url", non_empty, None,
           "be one node of a cluster sharing this Redis (docs/scale-out.md); default: one process",
           metavar="redis://HOST:PORT/DB"),
    # tank_core.Limits: what one peer may take (docs/explanation/limits.md); "off" turns one off.
    Option("--input-budget", "input_budget", size, 65_536,
           "bytes of one connection's input handled before it yields its loop turn", metavar="BYTES"),
    Option("--max-frames-per-second", "max_frames_per_second", or_off(rate), 1_000.0,
           "frames per second from one connection (bursts of twice that); more: close 1008",
           metavar="N|off"),
    Option("--max-input-bytes-per-second", "max_input_bytes_per_second", or_off(rate),
           1_048_576.0, "bytes per second from one connection; more: its reading pauses",
           metavar="BYTES|off"),
    Option("--max-connections", "max_connections", or_off(size), 100_000,
           "sockets open at once; more: 503", metavar="N|off"),
    Option("--max-connections-per-address", "max_connections_per_address", or_off(size), 10_000,
           "WebSocket connections from one client address; more: 503", metavar="N|off"),
    Option("--max-topics-per-connection", "max_topics_per_connection", or_off(size), 1_000,
           "topics one connection may hold; more: close 1008", metavar="N|off"),
    Option("--max-topic-length", "max_topic_length", size, 1_024,
           "bytes of a topic name; longer: close 1008 (API: 400)", metavar="BYTES"),
    Option("--max-partial-bytes", "max_partial_bytes", size, 64 * 1_048_576,
           "bytes of unfinished incoming messages in the process; more: close 1013",
           metavar="BYTES"),
    Option("--max-stats-entries", "max_stats_entries", size, 1_000,
           "topics and RTT samples listed one by one in /api/stats and /metrics", metavar="N"),
    Option("--log-level", "log_level", choice(LOG_LEVELS), "info", "debug, info or warning",
           metavar="{debug,info,warning}"),
    Option("--log-format", "log_format", choice(LOG_FORMATS), "text",
           "text (one line per record) or json (one JSON object per line: time, level, logger, "
           "message and the record's fields)", metavar="{text,json}"),
)


#: The options that are fields of ``tank_core.Limits``, under the same names.
LIMIT_FIELDS = tuple(name for name in Limits.__dataclass_fields__)


def _limits(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: None if values[name] is OFF else values[name] for name in LIMIT_FIELDS}


def add_serve_command(commands: Any) -> None:
    """Add ``serve`` to ``commands`` (argparse's sub-parsers action): one flag per option.

    Every flag defaults to None, so that ``resolve`` can tell "not given" from "given"."""
    serve = commands.add_parser(
        "serve",
        help="serve WebSocket clients and the HTTP API",
        description="Serve WebSocket clients and the HTTP API until SIGINT, SIGTERM or SIGHUP (a "
        "graceful shutdown: Close 1001 to every client). Each option can also be set with "
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
    log_format: str = "text"
    #: The server-side TLS context (``--certfile``/``--keyfile``); None: plain ws://.
    ssl: ssl.SSLContext | None = None


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server context from PEM files, or a one-line ``UsageError`` saying what is wrong."""
    if certfile is None:
        if keyfile is not None:
            raise UsageError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {exc.filename or certfile}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        files = certfile if keyfile is None else f"{certfile} and {keyfile}"
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise UsageError(f"cannot use the certificate in {files}: {reason}") from None
    return context


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
            compression=not values["no_compression"],
            compression_threshold=values["compression_threshold"],
            history=None if values["history_size"] is OFF else History(
                keep=HistoryPolicy(size=values["history_size"], ttl=values["history_ttl"])
            ),
            max_message_size=values["max_message_size"],
            max_outbox_bytes=values["max_outbox_bytes"],
            allowed_origins=frozenset(values["allowed_origin"] or ()),
            trusted_proxies=frozenset(values["trusted_proxy"] or ()),
            allowed_hosts=frozenset(values["allowed_host"] or ()),
            limits=Limits(**_limits(values)),
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
        log_format=values["log_format"],
        ssl=_tls_context(values["certfile"], values["keyfile"]),
    )
