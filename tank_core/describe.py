"""How the adapters put things into words: an exception as ``Type: message``, a callable by name.

``describe_error`` gives the ``error`` text the client adapters put in ``TransportClosed``
(docs/client.md, adapter contract), which ``on_close`` then reports (``ConnectionRefusedError:
[Errno 111] ...``). ``callable_name`` names a callback or hook in log lines. No I/O, no logging.
"""

from __future__ import annotations

__all__ = ["callable_name", "describe_error"]


def describe_error(exc: BaseException) -> str:
    """``Type: message``, or just ``Type`` when the message is empty."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def callable_name(fn: object) -> str:
    """The qualified name of a function (or method); the ``repr`` of anything else callable."""
    return getattr(fn, "__qualname__", None) or repr(fn)
