"""The client: its state machine (``machine``), the connections it asks for (``connections``), what
it tells the application (``notifications``), and the session rules every client adapter shares
(``session``, ``connect``, ``dispatch``, ``streams``)."""

from .machine import ClientAction, ClientState, TankClient
from .notifications import (
    Closed,
    HeartbeatReceived,
    HeartbeatTimedOut,
    LatencyMeasured,
    MessageArrived,
    Opened,
    Reconnecting,
    Welcomed,
)
from .session import ClientSession

__all__ = [
    "ClientAction",
    "ClientSession",
    "ClientState",
    "Closed",
    "HeartbeatReceived",
    "HeartbeatTimedOut",
    "LatencyMeasured",
    "MessageArrived",
    "Opened",
    "Reconnecting",
    "TankClient",
    "Welcomed",
]
