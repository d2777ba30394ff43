"""``tank_core.server.hooks``: the routing table of the server's hooks and ``authenticate``'s verdict."""

from __future__ import annotations

import pytest

from tank_core.notifications import (
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
from tank_core.server.hooks import (
    HOOK_QUEUE_SIZE,
    NOTIFICATION_KINDS,
    REFUSED,
    UNEXPECTED_ANSWER,
    hook_table,
    interpret_verdict,
)


def _connect(event: object) -> None: ...
def _disconnect(event: object) -> None: ...
def _message(event: object) -> None: ...
def _error(event: object) -> None: ...
def _event(event: object) -> None: ...


def test_the_default_queue_is_1024_and_every_notification_kind_is_routable() -> None:
    assert HOOK_QUEUE_SIZE == 1024
    assert list(NOTIFICATION_KINDS) == [
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
    ]


def test_no_hooks_no_table() -> None:
    assert hook_table() == {}


def test_each_kind_gets_its_own_hook_then_on_event() -> None:
    table = hook_table(
        on_connect=_connect,
        on_disconnect=_disconnect,
        on_message=_message,
        on_error=_error,
        on_event=_event,
    )
    assert table[ClientConnected] == (_connect, _event)
    assert table[ClientDisconnected] == (_disconnect, _event)
    assert table[MessageReceived] == (_message, _event)
    assert table[ErrorOccurred] == (_error, _event)
    for kind in (TopicSubscribed, TopicUnsubscribed, HeartbeatTimedOut, SlowConsumerClosed, BrokerUp):
        assert table[kind] == (_event,)
    assert list(table) == list(NOTIFICATION_KINDS)


def test_only_the_kinds_with_a_hook_are_in_the_table() -> None:
    assert hook_table(on_message=_message) == {MessageReceived: (_message,)}
    assert hook_table(on_connect=_connect, on_error=_error) == {
        ClientConnected: (_connect,),
        ErrorOccurred: (_error,),
    }


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (True, (True, 0, "")),
        (False, REFUSED),
        (None, REFUSED),
        (403, (False, 403, "Forbidden")),
        (400, (False, 400, "Bad Request")),
        (599, (False, 599, "Refused")),
        (503, (False, 503, "Service Unavailable")),
    ],
)
def test_the_documented_answers_need_no_complaint(answer: object, verdict: tuple[bool, int, str]) -> None:
    complaints: list[tuple[str, object]] = []
    assert interpret_verdict(answer, lambda msg, arg: complaints.append((msg, arg))) == verdict
    assert complaints == []


@pytest.mark.parametrize("answer", [1, 200, 399, 600, "yes", 403.0, object()])
def test_anything_else_is_a_refusal_with_401_and_a_complaint(answer: object) -> None:
    complaints: list[tuple[str, object]] = []
    assert interpret_verdict(answer, lambda msg, arg: complaints.append((msg, arg))) == REFUSED
    assert complaints == [(UNEXPECTED_ANSWER, answer)]
    assert REFUSED == (False, 401, "Unauthorized")
