"""``connect(url, ...)`` written once: its parameters, their defaults, and their validation.

docs/client.md ("``connect(...)``") is the contract, the same for every client adapter. The
settings become a ``ClientConfig`` when ``connect(...)`` is called, so a bad one raises
``ConfigError`` (naming the field) before ``async with``; the callbacks become ``ClientCallbacks``.
An adapter's ``connect`` subclasses ``ClientConnect``, names its ``Client``
(``class connect(ClientConnect[Client], client=Client)``) and says how to run it on its loop
(``_session``: start it, ``wait_open``, yield it, ``close`` it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..config import ClientConfig
from ..errors import ConfigError
from .dispatch import (
    ClientCallbacks,
    OnClose,
    OnHeartbeat,
    OnHeartbeatTimeout,
    OnMessage,
    OnReconnect,
    OnRecover,
)
from .session import ClientSession

if TYPE_CHECKING:
    import ssl

__all__ = ["ClientConnect"]

C = TypeVar("C", bound=ClientSession[Any])


class ClientConnect(ABC, Generic[C]):
    """``connect(url, ...)``: entering waits for the first open; leaving closes the client for
    good. The settings are validated at the call (``ConfigError``); ``self.client`` is the client."""

    def __init__(
        self,
        url: str,
        user_id: str | None = None,
        token: str | None = None,
        heartbeat: bool = True,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        reconnect: bool = True,
        *,
        on_message: OnMessage | None = None,
        on_heartbeat: OnHeartbeat | None = None,
        on_heartbeat_timeout: OnHeartbeatTimeout | None = None,
        on_reconnect: OnReconnect | None = None,
        on_close: OnClose | None = None,
        on_recover: OnRecover | None = None,
        reconnect_initial_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        reconnect_stable_after: float = 10.0,
        connect_timeout: float = 10.0,
        send_queue_limit: int = 1000,
        max_message_size: int = 16 * 1_048_576,
        compression: bool = True,
        compression_threshold: int = 128,
        recover: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        if ssl is not None and ssl_context is not None:
            raise ConfigError("give the TLS context once: ssl= (ssl_context= is its old name)")
        context = ssl if ssl is not None else ssl_context
        config = ClientConfig(
            url=url,
            user_id=user_id,
            token=token,
            heartbeat=heartbeat,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            reconnect=reconnect,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_stable_after=reconnect_stable_after,
            connect_timeout=connect_timeout,
            send_queue_limit=send_queue_limit,
            max_message_size=max_message_size,
            compression=compression,
            compression_threshold=compression_threshold,
            recover=recover,
        )
        callbacks = ClientCallbacks(
            on_message=on_message,
            on_heartbeat=on_heartbeat,
            on_heartbeat_timeout=on_heartbeat_timeout,
            on_reconnect=on_reconnect,
            on_close=on_close,
            on_recover=on_recover,
        )
        # wss:// verifies the server's certificate with the system's authorities unless a context
        # says otherwise (ssl=, e.g. one that trusts your own authority).
        self.client: C = self._client(config, callbacks, context)
        self._entered: AbstractAsyncContextManager[C] | None = None

    #: The adapter's ``Client`` class.
    _client: Callable[[ClientConfig, ClientCallbacks, ssl.SSLContext | None], C]

    def __init_subclass__(
        cls,
        *,
        client: Callable[[ClientConfig, ClientCallbacks, ssl.SSLContext | None], C] | None = None,
        **options: Any,
    ) -> None:
        super().__init_subclass__(**options)
        if client is not None:
            cls._client = staticmethod(client)  # a class or a function, never bound to self

    @abstractmethod
    def _session(self, client: C) -> AbstractAsyncContextManager[C]:
        """Start ``client``, wait for its first open and give it; close it when left."""

    async def __aenter__(self) -> C:
        self._entered = self._session(self.client)
        return await self._entered.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._entered is not None, "__aexit__ without __aenter__"
        return await self._entered.__aexit__(exc_type, exc, tb)
