"""Debug tracing: one log line per frame in and out, on logger ``tank.frames``.

The core describes the frames (``tank_core.trace``); the adapter creates a tracer only when that
logger is enabled for DEBUG at start, so tracing costs one boolean test per dispatch otherwise.
"""

from __future__ import annotations

import logging

from tank_core.trace import FrameTracer

__all__ = ["FrameTracer", "frame_logger", "make_tracer"]

frame_logger = logging.getLogger("tank.frames")


def make_tracer() -> FrameTracer | None:
    """A tracer logging to ``tank.frames``, or None when that logger is not at DEBUG."""
    if not frame_logger.isEnabledFor(logging.DEBUG):
        return None
    return FrameTracer(frame_logger.debug)
