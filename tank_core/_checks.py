"""The checks every configuration object runs on its numbers, with one wording of the errors."""

from __future__ import annotations

import math

from .errors import ConfigError

__all__ = ["positive", "positive_int"]


def positive(name: str, value: object) -> None:
    """A finite number > 0 (not a bool), else ``ConfigError`` naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def positive_int(name: str, value: object) -> None:
    """An integer > 0 (not a bool), else ``ConfigError`` naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be an integer > 0, got {value!r}")
