"""Frozen server configuration, validated once when it is built.

Defaults and rules come from PROTOCOL.md, "Our decisions": interval 5 s, timeout 15 s, close timeout 2 s,
text heartbeat on, 1 MiB messages, 4 MiB outbox; "Interval > 0 and timeout > interval, else a clear
configuration error at start-up."
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ._checks import positive, positive_int
from .errors import ConfigError
from .history import History
from .limits import Limits

__all__ = ["BrokerConfig", "ClientConfig", "ServerConfig"]

#: The largest header of a server frame (RFC 6455 §5.2: 2 bytes, 8 of extended length, no mask).
_MAX_FRAME_HEAD = 10




@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """How a node reaches the Redis it shares with the other nodes (docs/scale-out.md).

    Build it from a URL with ``BrokerConfig.from_url("redis://HOST:PORT/DB")``. Redis pub/sub
    ignores the database number (channels are global to the server): nodes that must not hear each
    other need different ``prefix`` values, not different databases.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    #: Selected on the publishing connection; pub/sub itself is global (see above).
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: Channel names start with ``{prefix}:`` (``{prefix}:t:{topic}``, ``{prefix}:all``, ...).
    prefix: str = "tank"
    #: The subscribe connection silent this long gets a PING.
    probe_interval: float = 1.0
    #: A PING (or a PUBLISH) unanswered this long means Redis is gone: reconnect.
    probe_timeout: float = 2.0
    #: Seconds allowed to open both connections and subscribe everything.
    connect_timeout: float = 2.0
    #: Upper bound of the first retry's delay (full jitter: uniform in [0, bound], doubling).
    reconnect_initial_delay: float = 0.1
    #: Cap of the doubling bound.
    reconnect_max_delay: float = 2.0
    #: Messages for other nodes held while Redis is unreachable; the oldest go first (counted).
    max_buffered: int = 10_000
    #: The same bound in bytes of envelopes.
    max_buffered_bytes: int = 16 * 1_048_576
    #: PUBLISH commands written and not yet answered (the pipeline window).
    max_in_flight: int = 4096
    #: Seconds a node that dropped out of Redis stays expected: meanwhile the others answer
    #: ``"broker": "partial"`` (it misses what they publish); after it, the cluster is smaller.
    rejoin_grace: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"broker host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"broker port must be an integer 1-65535, got {self.port!r}")
        if isinstance(self.db, bool) or not isinstance(self.db, int) or self.db < 0:
            raise ConfigError(f"broker db must be an integer >= 0, got {self.db!r}")
        for name in ("username", "password"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"broker {name} must be a str or None, got {type(value).__name__}")
        if self.username is not None and self.password is None:
            raise ConfigError("a broker username needs a password (redis://USER:PASSWORD@HOST)")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigError(f"broker prefix must be a non-empty string, got {self.prefix!r}")
        for name in (
            "probe_interval",
            "probe_timeout",
            "connect_timeout",
            "reconnect_initial_delay",
            "reconnect_max_delay",
            "rejoin_grace",
        ):
            positive(name, getattr(self, name))
        if self.reconnect_max_delay < self.reconnect_initial_delay:
            raise ConfigError("reconnect_max_delay must be >= reconnect_initial_delay")
        positive_int("max_buffered", self.max_buffered)
        positive_int("max_buffered_bytes", self.max_buffered_bytes)
        positive_int("max_in_flight", self.max_in_flight)

    @classmethod
    def from_url(cls, url: str, **options: object) -> BrokerConfig:
        """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``; ``options`` set the other fields."""
        if not isinstance(url, str):
            raise ConfigError(f"a Redis URL is a str, got {type(url).__name__}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from None
        if parts.scheme != "redis":
            raise ConfigError(f"invalid Redis URL {url!r}: want redis://HOST:PORT/DB")
        if not parts.hostname:
            raise ConfigError(f"invalid Redis URL {url!r}: no host")
        if parts.query or parts.fragment:
            raise ConfigError(f"invalid Redis URL {url!r}: no query or fragment allowed")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"invalid Redis URL {url!r}: the path is a database number")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            host=parts.hostname,
            port=6379 if port is None else port,
            db=int(path) if path else 0,
            username=username,
            password=password,
            **options,  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything the server core needs to know; build it once, share it freely."""

    #: The WebSocket upgrade path ("/ws" in every Tank document).
    path: str = "/ws"
    #: Seconds between Pings (and text heartbeats) on each connection.
    heartbeat_interval: float = 5.0
    #: Seconds of silence after which a connection is closed with 1011.
    heartbeat_timeout: float = 15.0
    #: Seconds to wait for the peer's Close after ours before dropping TCP.
    close_timeout: float = 2.0
    #: Also send the reference's text frame ``heartbeat`` every interval.
    text_heartbeat: bool = True
    #: Relay application messages to every other client (the reference's case 4).
    relay: bool = True
    #: Largest incoming message in bytes; larger ones close the connection with 1009.
    max_message_size: int = 1_048_576
    #: Unsent bytes a connection may hold before it is closed 1008 ``slow consumer``.
    max_outbox_bytes: int = 4_194_304
    #: When non-empty, an upgrade whose Origin is not listed is answered 403.
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    #: When set, /api/* and /metrics need ``Authorization: apikey KEY``.
    api_key: str | None = None
    #: When True the core asks the application (``AuthorizeUpgrade``) before each upgrade.
    authenticate: bool = False
    #: When True the core asks the application (``AuthorizeSubscription``) before each new
    #: subscription and subscribes only once ``subscription_verdict`` allows it.
    authorize_subscriptions: bool = False
    #: Seconds a connection may take to send a complete HTTP request (upgrade or API call).
    request_timeout: float = 10.0
    #: Largest HTTP request body for the API, and largest request head.
    max_request_size: int = 1_048_576
    #: When set, this process is one node of a cluster sharing a Redis (docs/scale-out.md).
    broker: BrokerConfig | None = None
    #: What one peer may take: rates, counts and sizes (``tank_core.Limits``).
    limits: Limits = field(default_factory=Limits)
    #: Addresses of reverse proxies whose ``X-Forwarded-For`` is believed: behind one, the
    #: client's address is the last one it adds (for the API's loopback rule and the limits).
    trusted_proxies: frozenset[str] = field(default_factory=frozenset)
    #: Host names the API (``/api/*``, ``/metrics``) answers to without an API key, besides IP
    #: addresses and ``localhost``: any other ``Host`` is refused (DNS rebinding).
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    #: Agree permessage-deflate (RFC 7692) with clients that offer it. What we send is compressed
    #: once per publish and shared by every compressing subscriber (docs: compression).
    compression: bool = True
    #: Messages shorter than this many bytes are sent uncompressed (compressing them saves
    #: little and costs time).
    compression_threshold: int = 128
    #: Keep each topic's recent publications, numbered (``tank_core.History``); None: no history.
    #: ``GET /api/history`` reads it. Not yet on a cluster.
    history: History | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigError(f"path must be a string starting with '/', got {self.path!r}")
        if self.path.startswith("/api/") or self.path in ("/metrics", "/healthz", "/readyz"):
            raise ConfigError(f"path {self.path!r} collides with the HTTP API")
        positive("heartbeat_interval", self.heartbeat_interval)
        positive("heartbeat_timeout", self.heartbeat_timeout)
        positive("close_timeout", self.close_timeout)
        positive("request_timeout", self.request_timeout)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "heartbeat_timeout must be greater than heartbeat_interval "
                f"(got timeout {self.heartbeat_timeout!r} <= interval {self.heartbeat_interval!r})"
            )
        positive_int("max_message_size", self.max_message_size)
        positive_int("max_outbox_bytes", self.max_outbox_bytes)
        positive_int("max_request_size", self.max_request_size)
        for name in (
            "text_heartbeat", "relay", "authenticate", "authorize_subscriptions", "compression"
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        threshold = self.compression_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ConfigError(f"compression_threshold must be an integer >= 0, got {threshold!r}")
        if (
            self.allowed_origins is None
            or isinstance(self.allowed_origins, (str, bytes))
            or not hasattr(self.allowed_origins, "__iter__")
        ):
            raise ConfigError("allowed_origins must be a collection of origin strings")
        if not all(
            isinstance(o, str) for o in self.allowed_origins
        ):
            raise ConfigError("allowed_origins must be a collection of origin strings")
        if not isinstance(self.allowed_origins, frozenset):
            object.__setattr__(self, "allowed_origins", frozenset(self.allowed_origins))
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("api_key must be a non-empty string or None")
        if self.broker is not None and not isinstance(self.broker, BrokerConfig):
            raise ConfigError("broker must be a BrokerConfig (BrokerConfig.from_url(...)) or None")
        if not isinstance(self.limits, Limits):
            raise ConfigError("limits must be a tank_core.Limits")
        if self.history is not None and not isinstance(self.history, History):
            raise ConfigError("history must be a tank_core.History or None")
        if self.history is not None and self.broker is not None:
            # Offsets on a cluster must come from Redis, so that every node agrees (issue 11).
            raise ConfigError("history is not available on a cluster yet (broker set)")
        if self.max_outbox_bytes < self.max_message_size + _MAX_FRAME_HEAD:
            # One legal relay must never close an idle recipient that keeps up: the largest
            # message, framed, fits in an empty outbox.
            raise ConfigError(
                f"max_outbox_bytes ({self.max_outbox_bytes!r}) must be at least max_message_size "
                f"({self.max_message_size!r}) + {_MAX_FRAME_HEAD} (a frame's header)"
            )
        for name in ("trusted_proxies", "allowed_hosts"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                isinstance(item, str) and item for item in value
            ):
                raise ConfigError(f"{name} must be a collection of non-empty strings")
            if not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Everything the client state machine needs; defaults follow the seed document."""

    #: ``ws://host:port/path`` (or ``wss://``); ``user_id`` and ``token`` are added to its query.
    url: str
    user_id: str | None = None
    token: str | None = None
    #: Send ``{"type":"heartbeat"}`` and a Ping every interval; watch for silence.
    heartbeat: bool = True
    heartbeat_interval: float = 5.0
    #: Nothing at all received for this long: report, drop the connection, reconnect.
    heartbeat_timeout: float = 15.0
    #: Reconnect after any close that ``close()`` did not ask for.
    reconnect: bool = True
    #: Upper bound of the first retry's delay (full jitter: uniform in [0, bound]).
    reconnect_initial_delay: float = 0.5
    #: Cap of the exponentially growing bound.
    reconnect_max_delay: float = 30.0
    #: Seconds a connection must keep hearing from the server after it opened to count as stable:
    #: only the end of a stable connection (not by 1013) resets the backoff. One that ends sooner
    #: counts as a failed attempt, so a server that accepts and closes at once is not hammered.
    reconnect_stable_after: float = 10.0
    #: Seconds allowed for TCP plus the opening handshake.
    connect_timeout: float = 10.0
    #: Seconds ``close()`` waits for the server's Close before dropping the connection.
    close_timeout: float = 2.0
    #: Messages ``send()`` may queue while disconnected; beyond it, ``send()`` raises.
    send_queue_limit: int = 1000
    #: Largest message accepted from the server (characters); larger drops the connection.
    max_message_size: int = 16 * 1_048_576
    #: Offer permessage-deflate (RFC 7692): the server then may send compressed messages, and
    #: we compress ours from ``compression_threshold`` bytes up.
    compression: bool = True
    compression_threshold: int = 128
    #: Offer the recovery extension (``tank.recovery.v1``): with a server that keeps a history,
    #: every reconnect replays what each topic missed, or says it could not (``Recovered``).
    recover: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("ws://", "wss://")):
            raise ConfigError(f"url must start with ws:// or wss://, got {self.url!r}")
        for name in ("heartbeat", "reconnect", "recover"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("user_id", "token"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a str or None, got {type(value).__name__}")
        positive("heartbeat_interval", self.heartbeat_interval)
        positive("heartbeat_timeout", self.heartbeat_timeout)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "heartbeat_timeout must be greater than heartbeat_interval "
                f"(got timeout {self.heartbeat_timeout!r} <= interval {self.heartbeat_interval!r})"
            )
        positive("reconnect_initial_delay", self.reconnect_initial_delay)
        positive("reconnect_max_delay", self.reconnect_max_delay)
        if self.reconnect_max_delay < self.reconnect_initial_delay:
            raise ConfigError("reconnect_max_delay must be >= reconnect_initial_delay")
        positive("reconnect_stable_after", self.reconnect_stable_after)
        positive("connect_timeout", self.connect_timeout)
        positive("close_timeout", self.close_timeout)
        positive_int("send_queue_limit", self.send_queue_limit)
        positive_int("max_message_size", self.max_message_size)
        if not isinstance(self.compression, bool):
            raise ConfigError(f"compression must be True or False, got {self.compression!r}")
        threshold = self.compression_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ConfigError(f"compression_threshold must be an integer >= 0, got {threshold!r}")
