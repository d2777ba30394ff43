"""``tank_core.client.dispatch``: which callbacks each client notification calls, in which order."""

from __future__ import annotations

from collections.abc import Callable

from tank_core.actions import AbortTransport, OpenConnection
from tank_core.client import (
    Closed,
    HeartbeatReceived,
    HeartbeatTimedOut,
    LatencyMeasured,
    MessageArrived,
    Opened,
    Reconnecting,
    Welcomed,
)
from tank_core.client.dispatch import (
    DEBUG,
    INFO,
    Call,
    ClientCallbacks,
    ClientDispatch,
    Deliver,
    LogLine,
    Routing,
)

URL = "ws://127.0.0.1:8080/ws"


def _fn(name: str) -> Callable[..., object]:
    def fn(*args: object) -> None:
        return None

    fn.__qualname__ = name
    return fn


ON_MESSAGE = _fn("on_message")
ON_HEARTBEAT = _fn("on_heartbeat")
ON_TIMEOUT = _fn("on_heartbeat_timeout")
ON_RECONNECT = _fn("on_reconnect")
ON_CLOSE = _fn("on_close")
ALL = ClientCallbacks(
    on_message=ON_MESSAGE,
    on_heartbeat=ON_HEARTBEAT,
    on_heartbeat_timeout=ON_TIMEOUT,
    on_reconnect=ON_RECONNECT,
    on_close=ON_CLOSE,
)


def _message(topic: str | None, data: object = None) -> MessageArrived:
    return MessageArrived(text=f"text of {topic}", topic=topic, data=data)


def test_a_topic_message_calls_the_topic_callback_then_its_streams_then_on_message() -> None:
    dispatch = ClientDispatch(URL, ALL)
    news = _fn("news")
    dispatch.subscribed("news", news)
    message = _message("news", {"a": 1})
    assert dispatch.route(message) == Routing(
        steps=(Call(news, ({"a": 1}, message)), Deliver(message), Call(ON_MESSAGE, (message,)))
    )


def test_a_topic_without_callback_still_reaches_its_streams_and_a_plain_message_only_on_message() -> None:
    dispatch = ClientDispatch(URL, ClientCallbacks())
    topical = _message("news")
    assert dispatch.route(topical) == Routing(steps=(Deliver(topical),))
    assert dispatch.route(_message(None)) == Routing()
    plain = _message(None)
    assert ClientDispatch(URL, ALL).route(plain) == Routing(steps=(Call(ON_MESSAGE, (plain,)),))


def test_subscribe_replaces_a_callback_none_keeps_it_unsubscribe_forgets_it() -> None:
    dispatch = ClientDispatch(URL, ClientCallbacks())
    first, second = _fn("first"), _fn("second")
    message = _message("news", "d")
    dispatch.subscribed("news", first)
    dispatch.subscribed("news", second)
    dispatch.subscribed("news", None)
    assert dispatch.route(message).steps[0] == Call(second, ("d", message))
    dispatch.unsubscribed("news")
    dispatch.unsubscribed("never held")
    assert dispatch.route(message).steps == (Deliver(message),)


def test_heartbeat_calls_on_heartbeat_with_nothing() -> None:
    assert ClientDispatch(URL, ALL).route(HeartbeatReceived()) == Routing(steps=(Call(ON_HEARTBEAT),))
    assert ClientDispatch(URL, ClientCallbacks()).route(HeartbeatReceived()) == Routing()


def test_the_first_open_settles_and_a_reconnect_calls_on_reconnect_with_the_attempt() -> None:
    dispatch = ClientDispatch(URL, ALL)
    assert not dispatch.opened_once
    log = LogLine(DEBUG, "tank client: connected to %s", (URL,))
    assert dispatch.route(Opened(reconnect=False, attempt=0)) == Routing(log=log, opened=True)
    assert dispatch.opened_once
    assert dispatch.route(Opened(reconnect=True, attempt=3)) == Routing(
        log=log, opened=True, steps=(Call(ON_RECONNECT, (3,)),)
    )
    quiet = ClientDispatch(URL, ClientCallbacks())
    assert quiet.route(Opened(reconnect=True, attempt=1)).steps == ()


def test_a_heartbeat_timeout_logs_then_calls_on_heartbeat_timeout() -> None:
    routing = ClientDispatch(URL, ALL).route(HeartbeatTimedOut(silent_for=15.25))
    assert routing == Routing(
        log=LogLine(INFO, "tank client: nothing from %s for %.3f s", (URL, 15.25)),
        steps=(Call(ON_TIMEOUT, (15.25,)),),
    )


def test_closed_calls_on_close_says_final_and_remembers_the_error() -> None:
    dispatch = ClientDispatch(URL, ALL)
    assert dispatch.route(Closed(code=1006, reason="connect timeout", final=False)) == Routing(
        steps=(Call(ON_CLOSE, (1006, "connect timeout")),)
    )
    assert dispatch.last_error == "connect timeout"
    assert dispatch.route(Closed(code=1000, reason="", final=True)) == Routing(
        final=True, steps=(Call(ON_CLOSE, (1000, "")),)
    )
    assert dispatch.last_error == "closed with code 1000"
    dispatch.route(Opened(reconnect=True, attempt=1))
    assert dispatch.last_error is None


def test_reconnecting_logs_the_last_error_and_welcomed_logs_the_id() -> None:
    dispatch = ClientDispatch(URL, ALL)
    dispatch.route(Closed(code=1006, reason="ConnectionRefusedError: nope", final=False))
    assert dispatch.route(Reconnecting(delay=0.25, attempt=2)) == Routing(
        log=LogLine(
            INFO,
            "tank client: %s: %s; attempt %d in %.3f s",
            (URL, "ConnectionRefusedError: nope", 2, 0.25),
        )
    )
    assert dispatch.route(Welcomed(user_id="u1")) == Routing(
        log=LogLine(DEBUG, "tank client: welcomed as %r", ("u1",))
    )


def test_latency_and_transport_actions_ask_for_nothing() -> None:
    dispatch = ClientDispatch(URL, ALL)
    for note in (
        LatencyMeasured(rtt=0.01),
        OpenConnection(conn_id=1, host="h", port=1),
        AbortTransport(conn_id=1),
    ):
        assert dispatch.route(note) == Routing()


def test_the_messages_connect_raises_name_the_url_and_the_last_error() -> None:
    dispatch = ClientDispatch(URL, ALL)
    assert str(dispatch.no_connection(10.0)) == (
        f"tank: no connection to {URL} within 10 s (last error: none)"
    )
    dispatch.route(Closed(code=1006, reason="upgrade refused with HTTP 401", final=True))
    error = dispatch.cannot_connect()
    assert isinstance(error, ConnectionError)
    assert str(error) == f"tank: cannot connect to {URL}: upgrade refused with HTTP 401"
    timeout = dispatch.no_connection(0.5)
    assert isinstance(timeout, TimeoutError)
    assert str(timeout) == (
        f"tank: no connection to {URL} within 0.5 s (last error: upgrade refused with HTTP 401)"
    )
