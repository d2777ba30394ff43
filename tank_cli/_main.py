"""``main``: parse the command line and hand it to ``serve``, ``sub`` or ``pub``.

``tank --version`` prints ``tank VERSION`` (the installed distribution's version) and exits 0; no
command, or an unknown one, is one line on stderr and exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

from ._args import Parser
from ._clients import add_client_commands, main_pub, main_sub
from ._config import add_serve_command
from ._serve import main_serve

__all__ = ["DISTRIBUTION", "build_parser", "main", "version"]

#: The distribution whose version ``tank --version`` prints.
DISTRIBUTION = "tank-python"


def version() -> str:
    """The installed version of Tank for Python, or ``unknown`` when run from an uninstalled tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> Parser:
    parser = Parser(prog="tank", description="Tank for Python: WebSocket pub/sub server.")
    parser.add_argument("--version", action="version", version=f"tank {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    add_serve_command(commands)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tank`` command: the exit status (argparse's own exits raise ``SystemExit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sub":
        return main_sub(args)
    if args.command == "pub":
        return main_pub(args)
    return main_serve(args, f"{parser.prog} {args.command}")
