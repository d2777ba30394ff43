"""``tank sub`` and ``tank pub``: the client side of the command line.

``sub`` prints each message of its topics as it arrives (``--json``: JSON Lines) until SIGINT or
SIGTERM, reconnecting through ``tank_asyncio.connect``. On stderr it says what it is doing, one
short line each: connecting, connected, subscribed (and again on every reconnect), disconnected. A
final HTTP answer to its upgrade (a 4xx but 408 and 429: a refusal that retrying will not change)
makes it give up at once, naming the status; so does having no first connection within 10 s.

``pub`` publishes through the HTTP API (the data from standard input when it is ``-``) and prints
what the answer says: ``delivered N``, N counted on the node that answered, and on a cluster node
the broker's state, ``delivered N (broker: up)``. A failure (an HTTP error, an unreachable server) is
one line on stderr and exit status 1. docs/client.md, "Command line".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http
import json
import logging
import os
import re
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

import tank_asyncio

from ._args import EXIT_FAILURE, http_url, non_empty, print_error, ws_url

__all__ = [
    "PUB_TIMEOUT",
    "SUB_CONNECT_TIMEOUT",
    "add_client_commands",
    "final_refusal",
    "main_pub",
    "main_sub",
]

#: Seconds ``tank pub`` waits for the HTTP API.
PUB_TIMEOUT = 10.0
#: Seconds ``tank sub`` tries to make its first connection before giving up (exit status 1).
SUB_CONNECT_TIMEOUT = 10.0


def add_client_commands(commands: Any) -> None:
    """Add ``sub`` and ``pub`` to ``commands`` (argparse's sub-parsers action)."""
    sub = commands.add_parser(
        "sub",
        help="print the messages of topics as they arrive",
        description="Subscribe to TOPICs and print each message as it arrives: its data (a string "
        "as it is, anything else as JSON), or with --json one JSON object per line "
        '{"topic": ..., "data": ..., "time": RFC 3339}. Says on stderr when it is connecting, '
        "connected and subscribed. Reconnects and resubscribes on its own; gives up (exit status "
        "1) on a final HTTP answer to its upgrade (401, 403, 404...) or when the first connection "
        "does not come within 10 s. SIGINT or SIGTERM stop it (exit status 0).",
    )
    sub.add_argument("topics", nargs="+", metavar="TOPIC", help="a topic to subscribe to")
    sub.add_argument("--url", type=ws_url, default="ws://127.0.0.1:8080/ws",
                     help="the server's WebSocket URL; default ws://127.0.0.1:8080/ws")
    sub.add_argument("--json", action="store_true", help="print JSON Lines")
    sub.add_argument("--user-id", type=non_empty, default=None, help="the user_id to connect as")
    sub.add_argument("--token", default=None, help="the token query parameter")
    pub = commands.add_parser(
        "pub",
        help="publish to a topic through the HTTP API",
        description="POST {\"topic\": TOPIC, \"data\": DATA} to URL/api/publish and print "
        "'delivered N', N being how many subscribers it reached on that node; a cluster node's "
        "answer adds the broker's state: 'delivered N (broker: up)'.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("data", metavar="DATA",
                     help="the message; - reads it from standard input (UTF-8, one final newline "
                     "dropped)")
    pub.add_argument("--api", type=http_url, default="http://127.0.0.1:8080",
                     help="the server's HTTP base URL; default http://127.0.0.1:8080")
    pub.add_argument("--api-key", type=non_empty, default=None, metavar="KEY",
                     help="send 'Authorization: apikey KEY'")


# ---------------------------------------------------------------------- tank sub


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


#: The reason the client gives a connection attempt whose upgrade got an HTTP answer other than 101
#: (tank_core.client.machine: "upgrade refused with HTTP 404"); a reason phrase, if ever added, too.
_REFUSED = re.compile(r"upgrade refused with HTTP (\d{3})\b[ :]*(.*)")
#: The 4xx answers worth retrying: a timeout, and "too many requests".
_TRANSIENT = frozenset({408, 429})


def final_refusal(reason: str) -> str | None:
    """``HTTP 404 Not Found`` when ``reason`` (of a closed connection attempt) says the upgrade got a
    final HTTP answer: a 4xx but 408 and 429, which retrying will not change; else None."""
    match = _REFUSED.search(reason)
    if match is None:
        return None
    status = int(match.group(1))
    if not 400 <= status <= 499 or status in _TRANSIENT:
        return None
    phrase = match.group(2).strip()
    if not phrase:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
    return f"HTTP {status} {phrase}".rstrip()


def _say(text: str) -> None:
    print(f"tank sub: {text}", file=sys.stderr, flush=True)


async def _sub(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopped: list[str] = []
    refused: list[str] = []

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

    url = args.url
    topics = list(dict.fromkeys(args.topics))
    online = [False]
    #: The last reason an attempt failed for, while not connected (said once, not per retry).
    failing: list[str] = []

    def on_close(code: int, reason: str) -> None:
        if session.client.closed or stopped:
            return
        refusal = final_refusal(reason)
        if refusal is not None:  # a 401, 403, 404...: trying again will not change it
            refused.append(refusal)
            stop("refused")
            return
        if online[0]:  # one line per lost connection, not per retry
            online[0] = False
            failing[:] = []
            _say(f"disconnected ({code}{' ' + reason if reason else ''}); reconnecting to {url}")
        elif failing != [reason]:
            failing[:] = [reason]
            _say(f"cannot connect ({reason or code}); retrying")

    def on_reconnect(attempt: int) -> None:
        online[0] = True
        failing[:] = []
        _say(f"reconnected to {url}")
        _say(f"subscribed to {', '.join(session.client.topics)}")

    session = tank_asyncio.connect(url, user_id=args.user_id, token=args.token,
                                   on_close=on_close, on_reconnect=on_reconnect,
                                   connect_timeout=SUB_CONNECT_TIMEOUT)
    _say(f"connecting to {url}")
    try:
        async with session as client:
            online[0] = True
            failing[:] = []
            _say(f"connected to {url}")
            for topic in topics:
                await client.subscribe(topic, show)
            _say(f"subscribed to {', '.join(topics)}")
            await client.wait_closed()
    except asyncio.CancelledError:
        if not stopped:
            raise
        task.uncancel()
        if refused:
            print_error("tank sub", f"{url} refused the upgrade: {refused[0]}; not retrying")
            return EXIT_FAILURE
        return 0
    except OSError as exc:  # ConnectionError, TimeoutError
        print_error("tank sub", str(exc).removeprefix("tank: "))
        return EXIT_FAILURE
    return 0


def main_sub(args: argparse.Namespace) -> int:
    """Run ``tank sub`` with the parsed ``args``; the exit status."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_sub(args))
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------- tank pub


def _stdin_data() -> str:
    """The message ``tank pub TOPIC -`` reads: standard input as UTF-8, one final newline dropped
    (``echo hello | tank pub news -`` publishes ``hello``)."""
    if sys.stdin is None:  # started with stdin closed
        raise OSError("standard input is closed")
    raw = sys.stdin.buffer.read()
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def main_pub(args: argparse.Namespace) -> int:
    """Run ``tank pub`` with the parsed ``args``; the exit status."""
    url = args.api.rstrip("/") + "/api/publish"
    data = args.data
    if data == "-":
        try:
            data = _stdin_data()
        except (OSError, ValueError) as exc:
            print_error("tank pub", f"cannot read the message from standard input: {exc}")
            return EXIT_FAILURE
    body = json.dumps({"topic": args.topic, "data": data}).encode()
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
        print_error("tank pub", f"HTTP {exc.code} from {url}: {detail}")
        return EXIT_FAILURE
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        print_error("tank pub", f"cannot reach {url}: {reason}")
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        print_error("tank pub", f"{url}: {exc}")
        return EXIT_FAILURE
    delivered = answer.get("delivered") if isinstance(answer, dict) else None
    if isinstance(delivered, bool) or not isinstance(delivered, int):
        print_error("tank pub", f"{url}: unexpected answer {answer!r}")
        return EXIT_FAILURE
    broker = answer.get("broker")
    # A cluster node counts its own subscribers; "broker" says whether the other nodes were reached.
    suffix = f" (broker: {broker})" if isinstance(broker, str) else ""
    print(f"delivered {delivered}{suffix}", flush=True)
    return 0
