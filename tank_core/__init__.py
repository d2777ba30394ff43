"""Tank for Python's sans-IO core: the whole protocol, no sockets, no tasks, no clock reads.

The names most users need are here; the rest is grouped by role:

- ``tank_core.events``: what happened to a connection (inputs: ``BytesReceived``...);
- ``tank_core.actions``: what the core asks of its driver (``OpenConnection``, ``AbortTransport``...);
- ``tank_core.notifications``: what the server tells the application (``ClientConnected``...);
- ``tank_core.client``: the client machine and what it tells the application;
- ``tank_core.cluster``: the Redis broker link (docs/scale-out.md);
- ``tank_core.testing``: a fake clock, fake transports and peers, a fake server (docs/testing.md).

Drive a ``TankServer`` with events and a monotonic ``now``, carry out the actions it returns, take
its bytes with ``data_to_send`` when a socket can be written, sleep until ``next_deadline()``
(docs/custom-transports.md). A transport that frames WebSocket messages itself (ASGI) accepts with
``accept(..., messages=True)`` and takes ``messages_to_send``. ``ServerSession`` adds the session
rules every adapter shares. ``Engine`` is the message-level layer beneath ``TankServer``.
"""

from . import actions, events, notifications
from .client import ClientSession, TankClient
from .config import BrokerConfig, ClientConfig, ServerConfig
from .errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError, TankError
from .history import History, HistoryPolicy
from .limits import Limits
from .server import TankServer
from .server.engine import Engine
from .server.session import ServerSession
from .server.stats import ServerStats

__all__ = [
    "BrokerConfig",
    "ClientConfig",
    "ClientSession",
    "ConfigError",
    "Engine",
    "History",
    "HistoryPolicy",
    "Limits",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerConfig",
    "ServerSession",
    "ServerStats",
    "TankClient",
    "TankError",
    "TankServer",
    "actions",
    "events",
    "notifications",
]
