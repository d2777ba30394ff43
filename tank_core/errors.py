"""The exception hierarchy: who is at fault picks the exception.

A peer's faults never raise (they become close actions or HTTP answers); these are for the caller.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "TankError",
]


class TankError(Exception):
    """Base class of every exception raised by Tank."""


class ProtocolError(TankError):
    """Something broke the rules of the protocol."""


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly; the message says what to do instead."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. Never raised at the caller: carried in notifications for logs."""


class ConfigError(TankError, ValueError):
    """A configuration value is invalid; the message names the field."""
