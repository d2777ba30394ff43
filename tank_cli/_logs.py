"""``tank serve``'s log output: ``--log-format text`` or ``json``, on stderr, one record per line.

``text`` is ``TIME LEVEL LOGGER: MESSAGE``. ``json`` is one JSON object per line with ``time`` (RFC
3339, UTC, milliseconds), ``level`` (``debug``, ``info``, ``warning``, ``error``, ``critical``),
``logger``, ``message`` (formatted), then the record's structured fields (what was given as
``extra=``: ``conn_id``, ``user_id``, ``code``, ``reason``...), and ``exception`` when there is a
traceback. Values that are not JSON are written as their ``str``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

__all__ = ["LEVELS", "JsonFormatter", "TEXT_FORMAT", "configure"]

#: ``--log-level`` to the logging module's levels.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_OWN = ("time", "level", "logger", "message", "exception")


def _rfc3339(created: float) -> str:
    when = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module header)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _OWN and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, log_format: str) -> None:
    """Send the records of ``level`` and above to stderr in ``log_format`` (``text``/``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=LEVELS[level], handlers=[handler])
