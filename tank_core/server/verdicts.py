"""The application's verdicts on upgrades and subscriptions, for every adapter alike.

``authenticate`` and ``authorize_subscribe`` may answer at once or later (a coroutine run as a
background task of the server); an exception refuses. A verdict that arrives after its connection
went, or that the core refuses with ``LocalProtocolError``, is logged and never stops the server;
any other failure is the poison rule's (``session.py``).
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..actions import Action, AuthorizeSubscription, AuthorizeUpgrade
from ..errors import LocalProtocolError
from ..events import UpgradeAuthorized, UpgradeRefused
from .facade import TankServer
from .hooks import AUTHENTICATE_RAISED, REFUSED, SubscribeHook, Verdict, interpret_verdict

__all__ = ["SessionVerdicts"]

logger = logging.getLogger("tank")


class SessionVerdicts(ABC):
    """Asking the application, and handing its answers to the core (``ServerSession``'s part)."""

    _core: TankServer
    _authenticate: Callable[[Any], object] | None
    _authorize_subscribe: SubscribeHook | None
    failure: BaseException | None

    @abstractmethod
    def _clock(self) -> float: ...

    @abstractmethod
    def _wall(self) -> float: ...

    @abstractmethod
    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None: ...

    @abstractmethod
    def _deliver(self, actions: list[Action]) -> None: ...

    @abstractmethod
    def _fail(self, exc: BaseException) -> None: ...

    def _authorize(self, ask: AuthorizeUpgrade) -> None:
        hook = self._authenticate
        if hook is None:  # cannot happen: __init__ refuses config.authenticate without a hook
            self._verdict(ask.conn_id, REFUSED)
            return
        try:
            result = hook(self._upgrade_request(ask))
        except Exception:
            logger.exception(AUTHENTICATE_RAISED)
            self._verdict(ask.conn_id, REFUSED)
            return
        if inspect.isawaitable(result):
            pending = result
            self._spawn(lambda: self._verdict_later(ask.conn_id, pending))
        else:
            self._verdict(ask.conn_id, interpret_verdict(result, logger.error))

    def _upgrade_request(self, ask: AuthorizeUpgrade) -> object:
        """What ``authenticate`` is given: the core's ``UpgradeRequest`` (an adapter may add what
        its transport knows, as the ASGI one adds the scope)."""
        return ask.request

    async def _verdict_later(self, conn_id: int, pending: Awaitable[object]) -> None:
        try:
            result = await pending
        except Exception:
            logger.exception(AUTHENTICATE_RAISED)
            verdict = REFUSED
        else:
            verdict = interpret_verdict(result, logger.error)
        self._verdict(conn_id, verdict)

    def _verdict(self, conn_id: int, verdict: Verdict) -> None:
        accepted, status, reason = verdict
        now, wall = self._clock(), self._wall()
        event: UpgradeAuthorized | UpgradeRefused
        if accepted:
            event = UpgradeAuthorized(conn_id=conn_id, now=now, wall_time=wall)
        else:
            event = UpgradeRefused(
                conn_id=conn_id, now=now, wall_time=wall, status=status, reason=reason
            )
        self._late_safe(lambda: self._core.receive(event), "verdict", conn_id)

    def _authorize_subscription(self, ask: AuthorizeSubscription) -> None:
        hook = self._authorize_subscribe
        if hook is None:  # cannot happen: __init__ refuses the config without a hook
            self._subscription_verdict(ask, False)
            return
        try:
            result = hook(ask, ask.topic)
        except Exception:
            logger.exception("authorize_subscribe raised: refusing the subscription")
            self._subscription_verdict(ask, False)
            return
        if inspect.isawaitable(result):
            pending = result
            self._spawn(lambda: self._subscription_verdict_later(ask, pending))
        else:
            self._subscription_verdict(ask, result is True)

    async def _subscription_verdict_later(
        self, ask: AuthorizeSubscription, pending: Awaitable[object]
    ) -> None:
        try:
            allowed = (await pending) is True
        except Exception:
            logger.exception("authorize_subscribe raised: refusing the subscription")
            allowed = False
        self._subscription_verdict(ask, allowed)

    def _subscription_verdict(self, ask: AuthorizeSubscription, allowed: bool) -> None:
        self._late_safe(
            lambda: self._core.subscription_verdict(
                ask.conn_id, ask.topic, allowed, now=self._clock(), wall_time=self._wall()
            ),
            "subscription verdict",
            ask.conn_id,
        )

    def _late_safe(self, call: Callable[[], list[Action]], what: str, conn_id: int) -> None:
        """A verdict may come late (its connection gone, the server shut down): the core either
        ignores it or refuses it with ``LocalProtocolError``; neither stops the server."""
        if self.failure is not None:
            return
        try:
            actions = call()
        except LocalProtocolError:
            logger.warning("%s for connection %d came too late; ignored", what, conn_id,
                           exc_info=True)
            return
        except Exception as exc:
            self._fail(exc)
            return
        try:
            self._deliver(actions)
        except Exception as exc:
            self._fail(exc)
