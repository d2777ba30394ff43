"""Tank for Python's sans-IO core: the whole protocol, no sockets, no tasks, no clock reads.

Drive a ``TankServer`` with transport events and a monotonic ``now``; carry out the actions it
returns; sleep until ``next_deadline()``. ``Engine`` is the message-level layer beneath it for
transports that already speak WebSocket messages (ASGI, HTTP/2).
"""

from .actions import (
    AbortTransport,
    Action,
    AuthorizeSubscription,
    AuthorizeUpgrade,
    ClientConnected,
    ClientDisconnected,
    CloseTransport,
    DiscardPending,
    EngineAction,
    ErrorCode,
    ErrorOccurred,
    HeartbeatTimedOut,
    MessageReceived,
    Notification,
    PauseReading,
    ResumeReading,
    SendBytes,
    SendBytesToEach,
    SendControl,
    SendPing,
    SendText,
    SendTextToEach,
    SlowConsumerClosed,
    StartClose,
    TopicSubscribed,
    TopicUnsubscribed,
    UpgradeRequest,
)
from .close_codes import validate_close_code
from .config import ServerConfig
from .engine import ConnectionState, Engine
from .errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError, TankError
from .events import (
    BytesReceived,
    Event,
    Flushed,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
)
from .server import TankServer
from .stats import ServerStats

__all__ = [
    "AbortTransport",
    "Action",
    "AuthorizeSubscription",
    "AuthorizeUpgrade",
    "BytesReceived",
    "ClientConnected",
    "ClientDisconnected",
    "CloseTransport",
    "ConfigError",
    "ConnectionState",
    "DiscardPending",
    "Engine",
    "EngineAction",
    "ErrorCode",
    "ErrorOccurred",
    "Event",
    "Flushed",
    "HeartbeatTimedOut",
    "LocalProtocolError",
    "MessageReceived",
    "Notification",
    "PauseReading",
    "ProtocolError",
    "RemoteProtocolError",
    "ResumeReading",
    "SendBytes",
    "SendBytesToEach",
    "SendControl",
    "SendPing",
    "SendText",
    "SendTextToEach",
    "ServerConfig",
    "ServerStats",
    "SlowConsumerClosed",
    "StartClose",
    "TankError",
    "TankServer",
    "TopicSubscribed",
    "TopicUnsubscribed",
    "TransportClosed",
    "UpgradeAuthorized",
    "UpgradeRefused",
    "UpgradeRequest",
    "validate_close_code",
]
