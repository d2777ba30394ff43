"""The server's application hooks without I/O: which hooks a notification reaches, and what
``authenticate`` answered.

docs/embedding.md ("Hooks") is the contract, the same for every server adapter. ``hook_table``
routes each kind of notification to its specific hook (``on_connect`` ...) then ``on_event``;
``interpret_verdict`` turns ``authenticate``'s answer into the verdict the core waits for. How a hook
is called (inline, or through the adapter's bounded queue of coroutine hooks) and the logging are
the adapter's: this module only names the log lines.
"""

from __future__ import annotations

import http
from collections.abc import Callable
from typing import TypeAlias

from ..actions import AuthorizeSubscription
from ..notifications import (
    BrokerDown,
    BrokerGap,
    BrokerUp,
    ClientConnected,
    ClientDisconnected,
    ErrorOccurred,
    HeartbeatTimedOut,
    HttpRequestAnswered,
    MessageReceived,
    SlowConsumerClosed,
    TopicSubscribed,
    TopicUnsubscribed,
)

__all__ = [
    "AUTHENTICATE_RAISED",
    "HOOK_QUEUE_SIZE",
    "HOOK_RAISED",
    "NOTIFICATION_KINDS",
    "REFUSED",
    "UNEXPECTED_ANSWER",
    "Hook",
    "SubscribeHook",
    "Verdict",
    "hook_table",
    "interpret_verdict",
]

#: A notification hook: a plain or coroutine function of the notification (and the server, when it
#: takes two parameters).
Hook: TypeAlias = Callable[..., object]
#: ``authorize_subscribe(conn, topic)``: ``conn`` has ``conn_id`` and ``user_id``; True allows,
#: anything else (or an exception) refuses.
SubscribeHook: TypeAlias = Callable[[AuthorizeSubscription, str], object]
#: (accepted, status, reason) of an authentication verdict, as fed back to the core.
Verdict: TypeAlias = tuple[bool, int, str]

#: Default bound of the queue between the protocol and the coroutine hooks (docs/embedding.md).
HOOK_QUEUE_SIZE = 1024

#: Every notification kind a hook may receive, in the order ``on_event`` documents them.
NOTIFICATION_KINDS: tuple[type, ...] = (
    ClientConnected,
    ClientDisconnected,
    TopicSubscribed,
    TopicUnsubscribed,
    MessageReceived,
    HeartbeatTimedOut,
    SlowConsumerClosed,
    ErrorOccurred,
    BrokerUp,
    BrokerDown,
    BrokerGap,
    HttpRequestAnswered,
)

#: The verdict for a refusal without a status of its own (False, None, an exception, nonsense).
REFUSED: Verdict = (False, 401, "Unauthorized")

#: Log lines (logger ``tank``) the adapters write, with their ``%`` arguments.
#: ``logger.exception(HOOK_RAISED, hook_name, kind_name)``: a hook raised.
HOOK_RAISED = "hook %s raised on %s"
#: ``logger.exception(AUTHENTICATE_RAISED)``: ``authenticate`` raised; the verdict is ``REFUSED``.
AUTHENTICATE_RAISED = "authenticate raised: refusing the upgrade with 401"
#: ``logger.error(UNEXPECTED_ANSWER, result)``: ``authenticate`` answered none of the above.
UNEXPECTED_ANSWER = (
    "authenticate returned %r; expected True, False or an HTTP status 400-599: refusing"
)


def hook_table(
    *,
    on_connect: Hook | None = None,
    on_disconnect: Hook | None = None,
    on_message: Hook | None = None,
    on_error: Hook | None = None,
    on_event: Hook | None = None,
) -> dict[type, tuple[Hook, ...]]:
    """The hooks of each notification kind that has any, in calling order: the kind's own hook,
    then ``on_event``."""
    specific: dict[type, Hook | None] = {
        ClientConnected: on_connect,
        ClientDisconnected: on_disconnect,
        MessageReceived: on_message,
        ErrorOccurred: on_error,
    }
    table: dict[type, tuple[Hook, ...]] = {}
    for kind in NOTIFICATION_KINDS:
        hooks = tuple(h for h in (specific.get(kind), on_event) if h is not None)
        if hooks:
            table[kind] = hooks
    return table


def interpret_verdict(result: object, complain: Callable[[str, object], object]) -> Verdict:
    """``authenticate``'s answer: True accepts; False (or None) is 401; an int 400-599 refuses with
    that status; anything else refuses with 401 after ``complain(UNEXPECTED_ANSWER, result)``
    (the adapter passes ``logger.error``)."""
    if result is True:
        return True, 0, ""
    if result is False or result is None:
        return REFUSED
    if isinstance(result, int) and not isinstance(result, bool) and 400 <= result <= 599:
        try:
            phrase = http.HTTPStatus(result).phrase
        except ValueError:
            phrase = "Refused"
        return False, result, phrase
    complain(UNEXPECTED_ANSWER, result)
    return REFUSED
