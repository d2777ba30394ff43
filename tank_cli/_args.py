"""What every ``tank`` command shares: exit statuses, one-line usage errors, and value parsers.

A parser error is ``PROG: error: MESSAGE`` on one line of stderr and exit status 2, whether it comes
from argparse (a flag) or from ``UsageError`` (an environment variable, an inconsistent config).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "Parser",
    "UsageError",
    "byte_count",
    "choice",
    "flag",
    "http_url",
    "non_empty",
    "origins",
    "port",
    "print_error",
    "seconds",
    "size",
    "ws_url",
]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad value found after argparse (an environment variable, a config check): exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``tank serve: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (want 0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (want 0-65535)")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r} (want > 0)")
    return value


def size(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want a number of bytes)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want > 0)")
    return value


def byte_count(text: str) -> int:
    """A number of bytes that may be 0."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want a number of bytes)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (want >= 0)")
    return value


class Off:
    """What ``off`` parses to for a limit that can be turned off (``None`` means "not given")."""

    def __repr__(self) -> str:
        return "off"


OFF = Off()


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r} (want a number per second)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r} (want > 0, or off)")
    return value


def or_off(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, or ``off`` (turns the limit off)."""

    def parse_or_off(text: str) -> Any:
        return OFF if text.strip().lower() == "off" else parse(text)

    return parse_or_off


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(choices)})"
            )
        return text

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (want 1/0, true/false, yes/no)")


def origins(text: str) -> list[str]:
    """A comma-separated list, as ``TANK_ALLOWED_ORIGIN`` gives it."""
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r} (want ws://HOST:PORT/PATH or wss://...)")
    return text


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r} (want http://HOST:PORT or https://...)")
    return text
