"""``tank serve``: the standalone server (issue 3: exactly these options, each also ``TANK_<OPTION>``).

The command line wins over the environment. At start one line goes to stdout, flushed:
``tank: serving ws://HOST:PORT/PATH (backend NAME)`` with the real port. SIGINT and SIGTERM shut
down gracefully (PROTOCOL.md), then the exit status is 0. A bad option value is one line on stderr
and exit status 2.

``tank sub`` and ``tank pub`` (issue 4) are the client side: ``sub`` prints each message of its
topics as it arrives (``--json``: JSON Lines) until SIGINT/SIGTERM; ``pub`` publishes through the
HTTP API and prints how many it reached. Their code is at the end of this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, TypedDict

from tank_core import (
    BrokerConfig,
    ClientConnected,
    ClientDisconnected,
    ConfigError,
    ErrorOccurred,
    HeartbeatTimedOut,
    Notification,
    ServerConfig,
    SlowConsumerClosed,
)
from tank_core.resp import require_hiredis

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
BACKENDS = ("asyncio", "trio")
LOG_LEVELS = ("debug", "info", "warning")
#: Seconds ``tank pub`` waits for the HTTP API.
PUB_TIMEOUT = 10.0
#: Seconds ``tank sub`` tries to make its first connection before giving up (exit status 1).
SUB_CONNECT_TIMEOUT = 10.0

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
    _Option("--redis-url", "redis_url", _non_empty, None,
            "be one node of a cluster sharing this Redis (docs/scale-out.md); default: one process",
            metavar="redis://HOST:PORT/DB"),
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
    _add_client_commands(commands)
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
            broker=None if values["redis_url"] is None else BrokerConfig.from_url(values["redis_url"]),
        )
        if config.broker is not None:
            require_hiredis()  # the `redis` extra: say so now, not as a traceback at start
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
    if args.command == "sub":
        return _main_sub(args)
    if args.command == "pub":
        return _main_pub(args)
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


# ---------------------------------------------------------------------- tank sub / tank pub


def _ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r} (want ws://HOST:PORT/PATH or wss://...)")
    return text


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r} (want http://HOST:PORT or https://...)")
    return text


def _add_client_commands(commands: Any) -> None:
    sub = commands.add_parser(
        "sub",
        help="print the messages of topics as they arrive",
        description="Subscribe to TOPICs and print each message as it arrives: its data (a string "
        "as it is, anything else as JSON), or with --json one JSON object per line "
        '{"topic": ..., "data": ..., "time": RFC 3339}. Reconnects and resubscribes on its own; '
        "SIGINT or SIGTERM stop it (exit status 0).",
    )
    sub.add_argument("topics", nargs="+", metavar="TOPIC", help="a topic to subscribe to")
    sub.add_argument("--url", type=_ws_url, default="ws://127.0.0.1:8080/ws",
                     help="the server's WebSocket URL; default ws://127.0.0.1:8080/ws")
    sub.add_argument("--json", action="store_true", help="print JSON Lines")
    sub.add_argument("--user-id", type=_non_empty, default=None, help="the user_id to connect as")
    sub.add_argument("--token", default=None, help="the token query parameter")
    pub = commands.add_parser(
        "pub",
        help="publish to a topic through the HTTP API",
        description="POST {\"topic\": TOPIC, \"data\": DATA} to URL/api/publish and print "
        "'delivered N', N being how many subscribers it reached.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("data", metavar="DATA")
    pub.add_argument("--api", type=_http_url, default="http://127.0.0.1:8080",
                     help="the server's HTTP base URL; default http://127.0.0.1:8080")
    pub.add_argument("--api-key", type=_non_empty, default=None, metavar="KEY",
                     help="send 'Authorization: apikey KEY'")


def _rfc3339_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


def _render(topic: str, data: object, as_json: bool) -> str:
    if as_json:
        return json.dumps({"topic": topic, "data": data, "time": _rfc3339_now()}, ensure_ascii=False)
    if isinstance(data, str):
        return data
    return json.dumps(data, ensure_ascii=False)


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


async def _sub(args: argparse.Namespace) -> int:
    from ._client import connect

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopped: list[str] = []

    def stop(why: str) -> None:
        if not stopped:
            stopped.append(why)
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)

    def show(data: object, message: Any) -> None:
        try:
            sys.stdout.write(_render(message.topic, data, args.json) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`tank sub x | head -1`): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            stop("stdout closed")

    online = [False]

    def on_close(code: int, reason: str) -> None:
        if online[0] and not session.client.closed:  # one line per lost connection, not per retry
            online[0] = False
            print(f"tank sub: disconnected ({code}{' ' + reason if reason else ''}); reconnecting",
                  file=sys.stderr, flush=True)

    def on_reconnect(attempt: int) -> None:
        online[0] = True
        print("tank sub: reconnected", file=sys.stderr, flush=True)

    session = connect(args.url, user_id=args.user_id, token=args.token, on_close=on_close,
                      on_reconnect=on_reconnect, connect_timeout=SUB_CONNECT_TIMEOUT)
    try:
        async with session as client:
            online[0] = True
            for topic in dict.fromkeys(args.topics):
                await client.subscribe(topic, show)
            await client.wait_closed()
    except asyncio.CancelledError:
        if not stopped:
            raise
        task.uncancel()
        return 0
    except OSError as exc:  # ConnectionError, TimeoutError
        _error("tank sub", str(exc).removeprefix("tank: "))
        return EXIT_FAILURE
    return 0


def _main_sub(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_sub(args))
    except KeyboardInterrupt:
        return 0


def _main_pub(args: argparse.Namespace) -> int:
    url = args.api.rstrip("/") + "/api/publish"
    body = json.dumps({"topic": args.topic, "data": args.data}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    if args.api_key is not None:
        request.add_header("Authorization", f"apikey {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=PUB_TIMEOUT) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.reason
        with contextlib.suppress(Exception):
            detail = json.loads(exc.read())["error"]
        _error("tank pub", f"HTTP {exc.code} from {url}: {detail}")
        return EXIT_FAILURE
    except urllib.error.URLError as exc:
        _error("tank pub", f"cannot reach {url}: {getattr(exc.reason, 'strerror', None) or exc.reason}")
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        _error("tank pub", f"{url}: {exc}")
        return EXIT_FAILURE
    delivered = answer.get("delivered") if isinstance(answer, dict) else None
    if isinstance(delivered, bool) or not isinstance(delivered, int):
        _error("tank pub", f"{url}: unexpected answer {answer!r}")
        return EXIT_FAILURE
    print(f"delivered {delivered}", flush=True)
    return 0
