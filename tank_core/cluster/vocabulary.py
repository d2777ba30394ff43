"""The broker link's own words for its two Redis connections (docs/scale-out.md).

``BrokerLink`` asks for its connections with these; ``TankServer`` turns them into connections like
any other (``OpenConnection``, the output lanes, ``AbortTransport``), so adapters never see them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BrokerClose", "BrokerConnect", "BrokerRole", "BrokerWrite"]


class BrokerRole(enum.Enum):
    """The two Redis connections of a broker link (docs/scale-out.md): one in subscribe mode,
    one for PUBLISH and its replies."""

    SUBSCRIBER = "subscriber"
    PUBLISHER = "publisher"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConnect:
    """Open a TCP connection to Redis for ``role``; answer with ``ConnectionOpened`` or
    ``TransportClosed`` (connection refused), passing ``generation`` back."""

    role: BrokerRole
    generation: int
    host: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerWrite:
    """Write ``data`` to the Redis connection of ``role`` (ignore it if that connection is not the
    one of ``generation``)."""

    role: BrokerRole
    generation: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerClose:
    """Close the Redis connection of ``role`` (or give up opening it). ``graceful``: after what is
    queued for it is written (shutdown); otherwise drop it now."""

    role: BrokerRole
    generation: int
    graceful: bool
