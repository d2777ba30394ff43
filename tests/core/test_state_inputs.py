"""Every (connection state x input) pair, h2-style: each has one documented outcome.

DESIGN.md §4: "Network races are not errors. Bytes, EOF or a pull of output for a closed connection are
ignored; application commands against it raise, because the application can check first." A verdict
for a connection that exists but is not waiting for one is a caller error (``LocalProtocolError``);
a verdict for a connection already gone is the same race as bytes after EOF and is ignored. Once
we sent a Close, no data frame follows it (RFC 6455 §5.5.1).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tank_core import LocalProtocolError, ServerConfig
from tank_core.actions import AbortTransport, Action, AuthorizeUpgrade, PauseReading, ResumeReading
from tank_core.events import (
    BytesReceived,
    Event,
    TransportClosed,
    UpgradeAuthorized,
    UpgradeRefused,
)
from tank_core.notifications import (
    ClientConnected,
    ClientDisconnected,
    ErrorCode,
    ErrorOccurred,
    MessageReceived,
)
from tank_core.server.http import ANSWER_BACKLOG
from tank_core.testing import FakeClock, FakePeer, Harness

N = TypeVar("N")
START = 2048.0
STATES = ["http_fresh", "mid_request", "authorizing", "ws_open", "ws_closing", "closed"]
INPUTS = [
    "bytes_frame",
    "bytes_garbage",
    "bytes_close",
    "transport_closed",
    "take_output",
    "upgrade_authorized",
    "upgrade_refused",
    "tick",
    "publish",
    "send",
    "close",
    "disconnect_user",
    "shutdown",
]
WEBSOCKET_STATES = ("ws_open", "ws_closing", "closed")
HTTP_STATES = ("http_fresh", "mid_request")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    assert len(payload) < 126
    key = b"\x37\xfa\x21\x3d"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + key + masked


FRAME = client_frame(0x1, b"hello")  # a valid text frame: a relay
GARBAGE = b"\x16\x03\x01 not http\r\n\r\n"  # bad HTTP, and a reserved opcode (0x6) as a frame
CLOSE_FRAME = client_frame(0x8, struct.pack("!H", 1000))
UPGRADE = (
    b"GET /ws?user_id=u HTTP/1.1\r\nHost: tank.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
HALF_REQUEST = UPGRADE[:40]


class At(TypedDict):
    now: float
    wall_time: float


def at(h: Harness) -> At:
    return {"now": h.now, "wall_time": h.clock.wall_time}


@dataclass
class World:
    h: Harness
    state: str
    conn: int
    obs: FakePeer
    peer: FakePeer | None = None
    #: Bytes written to ``conn`` before the input.
    written_before: int = 0


@dataclass
class Outcome:
    actions: list[Action] = field(default_factory=list)
    count: int | None = None
    error: LocalProtocolError | None = None
    #: Bytes written to ``conn`` by the input (flushed afterwards).
    written: bytes = b""
    #: What ``data_to_send`` gave (the "take_output" input).
    taken: bytes | None = b""
    #: The server asked to close ``conn`` during the input.
    close_asked: bool = False


def make_world(state: str) -> World:
    h = Harness(ServerConfig(authenticate=True), clock=FakeClock(START), authorize=True)
    obs = h.connect("obs")
    obs.send_text("sub:t")
    obs.take()
    peer: FakePeer | None = None
    match state:
        case "http_fresh":
            conn = h.accept()
        case "mid_request":
            conn = h.accept()
            assert h.feed(conn, HALF_REQUEST) == []
        case "authorizing":
            h.authorize = None
            conn = h.accept()
            actions = h.feed(conn, UPGRADE)
            assert any(isinstance(a, AuthorizeUpgrade) for a in actions)
        case "ws_open" | "ws_closing" | "closed":
            peer = h.connect("u")
            conn = peer.conn_id
            peer.send_text("sub:t")
            peer.take()
            if state == "ws_closing":
                h.apply(h.server.close(conn, **at(h)))
                peer.read()
                assert peer.close is not None and peer.close.code == 1000
                assert h.transports[conn].state == "open"
            elif state == "closed":
                peer.send_raw(CLOSE_FRAME)
                peer.read()
                assert h.transports[conn].state == "closed"
        case _:
            raise AssertionError(state)
    h.flush(conn)
    h.notifications.clear()
    return World(h, state, conn, obs, peer, len(h.transports[conn].written))


def apply_input(world: World, name: str) -> Outcome:
    h, conn = world.h, world.conn
    out = Outcome()
    since = len(h.output_log)
    try:
        match name:
            case "bytes_frame":
                out.actions = h.feed(conn, FRAME)
            case "bytes_garbage":
                out.actions = h.feed(conn, GARBAGE)
            case "bytes_close":
                out.actions = h.feed(conn, CLOSE_FRAME)
            case "transport_closed":
                out.actions = h.peer_closed(conn)
            case "take_output":
                out.taken = h.server.data_to_send(conn)
            case "upgrade_authorized":
                out.actions = h.answer_authorization(conn, True)
            case "upgrade_refused":
                out.actions = h.answer_authorization(conn, False)
            case "tick":
                out.actions = h.advance(h.config.close_timeout)
            case "publish":
                out.count, actions = h.server.publish("t", "news", **at(h))
                out.actions = h.apply(actions)
            case "send":
                out.actions = h.apply(h.server.send(conn, "direct", **at(h)))
            case "close":
                out.actions = h.apply(h.server.close(conn, **at(h)))
            case "disconnect_user":
                out.count, actions = h.server.disconnect_user("u", **at(h))
                out.actions = h.apply(actions)
            case "shutdown":
                out.actions = h.apply(h.server.shutdown(**at(h)))
            case _:
                raise AssertionError(name)
    except LocalProtocolError as exc:
        out.error = exc
    out.written = h.flush(conn)
    out.close_asked = h.close_asked(conn, since)
    return out


# --------------------------------------------------------------------------- frame helpers


def frames(data: bytes) -> list[tuple[int, bytes]]:
    result = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert not b1 & 0x80, "the server never masks"
        n = b1 & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        result.append((b0 & 0x0F, bytes(data[i : i + n])))
        i += n
    return result


def ws_stream(world: World) -> list[tuple[int, bytes]]:
    written = bytes(world.h.transports[world.conn].written)
    head, sep, rest = written.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 101"), written[:60]
    return frames(rest)


def assert_nothing_after_close(world: World) -> None:
    stream = ws_stream(world)
    opcodes = [op for op, _ in stream]
    if 0x8 in opcodes:
        assert opcodes.index(0x8) == len(opcodes) - 1, f"a frame followed our Close: {opcodes}"


def close_of(data: bytes) -> int | None:
    closes = [payload for op, payload in frames(data) if op == 0x8]
    assert len(closes) <= 1
    if not closes:
        return None
    return struct.unpack("!H", closes[0][:2])[0] if closes[0] else 1005


def texts(data: bytes) -> list[bytes]:
    return [payload for op, payload in frames(data) if op == 0x1]


def notes(actions: list[Action], kind: type[N]) -> list[N]:
    return [a for a in actions if isinstance(a, kind)]


def raised(out: Outcome, *words: str) -> None:
    assert out.error is not None, f"expected LocalProtocolError, got {out.actions}"
    message = str(out.error)
    assert message, "a LocalProtocolError must say what was wrong"
    for word in words:
        assert word in message, message


def tracked(world: World) -> bool:
    return world.conn in world.h.server.connection_ids()


# --------------------------------------------------------------------------- expected outcomes


def check_bytes_frame(world: World, out: Outcome) -> None:
    h = world.h
    assert out.error is None
    match world.state:
        case "http_fresh" | "mid_request":
            # Not an HTTP request line yet: h11 waits for more (request_timeout ends the wait).
            assert out.actions == [] and out.written == b""
            assert tracked(world)
        case "authorizing":
            # Kept, unread by the HTTP layer, until the verdict; then processed as WebSocket.
            assert out.actions == [] and out.written == b""
            assert h.transports[world.conn].paused
            h.answer_authorization(world.conn, True)
            assert world.obs.take() == ["hello"]
        case "ws_open":
            assert [m.data for m in notes(out.actions, MessageReceived)] == [b"hello"]
            assert world.obs.take() == ["hello"]
            assert out.written == b""  # never back to the sender
        case "ws_closing":
            assert out.actions == [] and out.written == b""  # data after our Close is ignored
            assert world.obs.take() == []
        case "closed":
            assert out.actions == [] and out.written == b""
            assert world.obs.take() == []


def check_bytes_garbage(world: World, out: Outcome) -> None:
    h = world.h
    assert out.error is None
    match world.state:
        case "http_fresh" | "mid_request":
            assert out.written.startswith(b"HTTP/1.1 400")
            assert out.close_asked
            assert not tracked(world)
        case "authorizing":
            assert out.actions == [] and out.written == b""
            actions = h.answer_authorization(world.conn, True)
            assert [d.code for d in notes(actions, ClientDisconnected)] == [1002]
            after = h.flush(world.conn).partition(b"\r\n\r\n")[2]
            assert close_of(after) == 1002
        case "ws_open":
            errors = notes(out.actions, ErrorOccurred)
            assert [e.code for e in errors] == [ErrorCode.READ_ERROR]
            assert close_of(out.written) == 1002
            assert out.close_asked
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1002]
        case "ws_closing":
            assert out.written == b""  # no second Close
            assert out.close_asked
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1000]
        case "closed":
            assert out.actions == [] and out.written == b""


def check_bytes_close(world: World, out: Outcome) -> None:
    h = world.h
    assert out.error is None
    match world.state:
        case "http_fresh" | "mid_request":
            assert out.actions == [] and out.written == b""
            assert tracked(world)
        case "authorizing":
            assert out.actions == [] and out.written == b""
            actions = h.answer_authorization(world.conn, True)
            assert [d.code for d in notes(actions, ClientDisconnected)] == [1000]
        case "ws_open":
            assert close_of(out.written) == 1000
            assert out.close_asked
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1000]
        case "ws_closing":
            assert out.written == b""
            assert out.close_asked
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1000]
            assert h.server.engine.connection_count == 1  # only the observer
        case "closed":
            assert out.actions == [] and out.written == b""


def check_transport_closed(world: World, out: Outcome) -> None:
    h = world.h
    assert out.error is None
    assert out.written == b""
    assert not tracked(world)
    match world.state:
        case "http_fresh" | "mid_request" | "closed":
            assert out.actions == []
        case "authorizing":
            assert out.actions == []
            # The hook's answer may still come: the race is ignored.
            assert h.answer_authorization(world.conn, True) == []
            assert h.answer_authorization(world.conn, False) == []
        case "ws_open":
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1006]
        case "ws_closing":
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1000]
    # Later network events for it are ignored too.
    assert h.feed(world.conn, FRAME) == []
    assert h.peer_closed(world.conn) == []


def check_take_output(world: World, out: Outcome) -> None:
    # make_world took everything already: nothing is waiting, and taking it again is harmless.
    assert out.error is None
    assert out.actions == [] and out.written == b""
    assert out.taken == (None if world.state == "closed" else b"")
    if world.state in ("ws_open", "ws_closing"):
        assert world.h.server.engine.outbox_of(world.conn) == 0


def check_verdict(world: World, out: Outcome, accept: bool) -> None:
    h = world.h
    match world.state:
        case "authorizing":
            assert out.error is None
            if accept:
                assert ResumeReading(conn_id=world.conn) in out.actions
                assert out.written.startswith(b"HTTP/1.1 101")
                assert texts(out.written.partition(b"\r\n\r\n")[2]) == [
                    b"Hello, u! Welcome to WebSocket server."
                ]
                assert len(notes(out.actions, ClientConnected)) == 1
            else:
                assert out.written.startswith(b"HTTP/1.1 401")
                assert out.written.endswith(b"Unauthorized")
                assert out.close_asked
                errors = notes(out.actions, ErrorOccurred)
                assert [e.code for e in errors] == [ErrorCode.AUTHENTICATION_FAILED]
        case "closed":
            # Gone: the verdict raced with the end of the connection (ignored, like bytes).
            assert out.error is None and out.actions == []
        case _:
            raised(out, str(world.conn), "verdict")
            assert out.written == b""
            if world.state in ("ws_open", "ws_closing"):
                assert h.server.engine.state_of(world.conn) is not None


def check_upgrade_authorized(world: World, out: Outcome) -> None:
    check_verdict(world, out, True)


def check_upgrade_refused(world: World, out: Outcome) -> None:
    check_verdict(world, out, False)


def check_tick(world: World, out: Outcome) -> None:
    assert out.error is None
    match world.state:
        case "ws_closing":
            # close_timeout after our Close, without the peer's: drop TCP.
            assert AbortTransport(conn_id=world.conn) in out.actions
            assert [d.code for d in notes(out.actions, ClientDisconnected)] == [1000]
            assert world.h.transports[world.conn].state == "aborted"
        case _:
            assert out.actions == [] and out.written == b""
            if world.state != "closed":
                assert tracked(world)


def check_publish(world: World, out: Outcome) -> None:
    assert out.error is None
    delivered = 2 if world.state == "ws_open" else 1
    assert out.count == delivered
    assert world.obs.take() == ['{"topic":"t","data":"news"}']
    if world.state == "ws_open":
        assert texts(out.written) == [b'{"topic":"t","data":"news"}']
    else:
        assert out.written == b""


def check_send(world: World, out: Outcome) -> None:
    match world.state:
        case "ws_open":
            assert out.error is None
            assert texts(out.written) == [b"direct"]
        case "ws_closing":
            raised(out, str(world.conn), "closing")
            assert out.written == b""
        case _:
            raised(out, str(world.conn))
            assert out.written == b""


def check_close(world: World, out: Outcome) -> None:
    match world.state:
        case "ws_open":
            assert out.error is None
            assert close_of(out.written) == 1000
            assert not world.h.server.engine.is_open(world.conn)
        case "ws_closing":
            raised(out, str(world.conn), "closing")
            assert out.written == b""  # never a second Close
        case _:
            raised(out, str(world.conn))
            assert out.written == b""


def check_disconnect_user(world: World, out: Outcome) -> None:
    assert out.error is None
    if world.state == "ws_open":
        assert out.count == 1
        assert close_of(out.written) == 1000
    else:
        assert (out.count, out.actions, out.written) == (0, [], b"")
    assert world.obs.take() == []


def check_shutdown(world: World, out: Outcome) -> None:
    assert out.error is None
    h = world.h
    assert h.server.shutting_down
    assert world.obs.take() == ["Server is shutting down"]
    match world.state:
        case "http_fresh" | "mid_request" | "authorizing":
            assert out.close_asked
            assert out.written == b""
            assert not tracked(world)
            if world.state == "authorizing":
                assert h.answer_authorization(world.conn, True) == []
        case "ws_open":
            assert texts(out.written) == [b"Server is shutting down"]
            assert close_of(out.written) == 1001
        case "ws_closing" | "closed":
            assert out.written == b""  # nothing after our Close, not even the goodbye


CHECKS: dict[str, Callable[[World, Outcome], None]] = {
    "bytes_frame": check_bytes_frame,
    "bytes_garbage": check_bytes_garbage,
    "bytes_close": check_bytes_close,
    "transport_closed": check_transport_closed,
    "take_output": check_take_output,
    "upgrade_authorized": check_upgrade_authorized,
    "upgrade_refused": check_upgrade_refused,
    "tick": check_tick,
    "publish": check_publish,
    "send": check_send,
    "close": check_close,
    "disconnect_user": check_disconnect_user,
    "shutdown": check_shutdown,
}

assert set(CHECKS) == set(INPUTS)


@pytest.mark.parametrize("input_name", INPUTS)
@pytest.mark.parametrize("state", STATES)
def test_state_x_input(state: str, input_name: str) -> None:
    world = make_world(state)
    out = apply_input(world, input_name)
    CHECKS[input_name](world, out)
    if state in WEBSOCKET_STATES:
        assert_nothing_after_close(world)
    world.h.server.engine.check_registry()
    deadline = world.h.server.next_deadline()
    assert deadline is None or deadline > world.h.now


# --------------------------------------------------------------------------- extra pairs


@pytest.mark.parametrize("state", HTTP_STATES)
def test_http_states_are_dropped_after_request_timeout(state: str) -> None:
    world = make_world(state)
    h = world.h
    h.advance(h.config.request_timeout - 2.0**-20)
    assert tracked(world)
    since = len(h.output_log)
    h.advance(2.0**-20)
    assert h.close_asked(world.conn, since)
    assert not tracked(world)


def test_closing_state_answers_no_ping() -> None:
    world = make_world("ws_closing")
    out = world.h.feed(world.conn, client_frame(0x9, b"ping?"))
    assert out == []
    assert world.h.flush(world.conn) == b""
    assert_nothing_after_close(world)


def test_closing_state_close_waits_behind_pending_data_then_nothing_more() -> None:
    world = make_world("ws_open")
    h = world.h
    h.apply(h.server.send(world.conn, "before", **at(h)))
    h.apply(h.server.close(world.conn, **at(h)))
    with pytest.raises(LocalProtocolError):
        h.server.send(world.conn, "after", **at(h))
    publish_count, actions = h.server.publish("t", "after", **at(h))
    h.apply(actions)
    assert publish_count == 1  # the observer only
    h.apply(h.server.broadcast("after", **at(h))[1])
    h.flush(world.conn)
    stream = ws_stream(world)
    assert [op for op, _ in stream][-2:] == [0x1, 0x8]
    assert stream[-2][1] == b"before"
    assert_nothing_after_close(world)


def test_taking_output_empties_the_outbox_whole_frames_at_a_time() -> None:
    world = make_world("ws_open")
    h = world.h
    h.apply(h.server.send(world.conn, "x" * 100, **at(h)))
    h.apply(h.server.send(world.conn, "y" * 10, **at(h)))
    assert h.server.engine.outbox_of(world.conn) == 102 + 12
    first = h.server.data_to_send(world.conn, max_bytes=50)
    assert first == b"\x81\x64" + b"x" * 100  # one whole frame, never a piece of one
    assert h.server.engine.outbox_of(world.conn) == 12
    assert h.server.data_to_send(world.conn) == b"\x81\x0a" + b"y" * 10
    assert h.server.engine.outbox_of(world.conn) == 0
    assert h.server.data_to_send(world.conn) == b""


def test_refusal_needs_an_error_status() -> None:
    world = make_world("authorizing")
    with pytest.raises(LocalProtocolError, match="4xx"):
        world.h.answer_authorization(world.conn, False, status=200)
    # Still waiting: a proper verdict works.
    assert world.h.answer_authorization(world.conn, False, status=403)
    assert world.h.flush(world.conn).startswith(b"HTTP/1.1 403")


UNKNOWN = 424242


@pytest.mark.parametrize(
    "name", ["bytes_frame", "bytes_garbage", "bytes_close", "transport_closed",
             "upgrade_authorized", "upgrade_refused"]
)
def test_network_events_for_an_unknown_connection_are_ignored(name: str) -> None:
    h = Harness(ServerConfig(), clock=FakeClock(START))
    now, wall = h.now, h.clock.wall_time
    events: dict[str, Event] = {
        "bytes_frame": BytesReceived(conn_id=UNKNOWN, data=FRAME, now=now, wall_time=wall),
        "bytes_garbage": BytesReceived(conn_id=UNKNOWN, data=GARBAGE, now=now, wall_time=wall),
        "bytes_close": BytesReceived(conn_id=UNKNOWN, data=CLOSE_FRAME, now=now, wall_time=wall),
        "transport_closed": TransportClosed(conn_id=UNKNOWN, now=now, wall_time=wall),
        "upgrade_authorized": UpgradeAuthorized(conn_id=UNKNOWN, now=now, wall_time=wall),
        "upgrade_refused": UpgradeRefused(conn_id=UNKNOWN, now=now, wall_time=wall),
    }
    assert h.server.receive(events[name]) == []
    assert h.server.connection_ids() == ()
    assert h.server.data_to_send(UNKNOWN) is None
    assert h.server.take_ready() == []


@pytest.mark.parametrize("command", ["send", "close"])
def test_application_commands_for_an_unknown_connection_raise(command: str) -> None:
    h = Harness(ServerConfig(), clock=FakeClock(START))
    with pytest.raises(LocalProtocolError, match=str(UNKNOWN)):
        if command == "send":
            h.server.send(UNKNOWN, "x", **at(h))
        else:
            h.server.close(UNKNOWN, **at(h))


def test_not_a_tank_event_raises() -> None:
    h = Harness(ServerConfig(), clock=FakeClock(START))
    with pytest.raises(LocalProtocolError, match="not a Tank event"):
        h.server.receive("bytes please")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- random sequences

APP_COMMANDS = {"send", "close", "upgrade_authorized", "upgrade_refused"}


@given(st.sampled_from(STATES), st.lists(st.sampled_from(INPUTS), max_size=8))
def test_any_sequence_of_inputs_keeps_the_invariants(state: str, inputs: list[str]) -> None:
    world = make_world(state)
    h = world.h
    upgraded = state in WEBSOCKET_STATES
    for name in inputs:
        out = apply_input(world, name)
        if out.error is not None:
            # Only commands that target one connection may raise, and only as a caller error.
            assert name in APP_COMMANDS, (name, out.error)
        if out.written.startswith(b"HTTP/1.1 101"):
            upgraded = True
        if upgraded:
            assert_nothing_after_close(world)
        h.server.engine.check_registry()
        deadline = h.server.next_deadline()
        assert deadline is None or deadline > h.now
        if not tracked(world):
            # Gone for good: every network event is ignored from now on.
            assert h.feed(world.conn, FRAME) == []
            assert h.server.data_to_send(world.conn) is None
    # The observer was never disturbed by whatever happened to the other connection.
    assert all(isinstance(m, str) for m in world.obs.take())
    assert world.obs.close is None or world.obs.close.code == 1001


def test_a_closing_connection_says_none_to_every_pull_once_its_lanes_are_empty() -> None:
    """``max_bytes`` or not, an emptied closing connection answers None (close it), never b""."""
    world = make_world("ws_open")
    h = world.h
    h.apply(h.server.close(world.conn, **at(h)))
    h.feed(world.conn, CLOSE_FRAME)  # the peer's answer: the core wants the socket closed
    assert h.server.data_to_send(world.conn, max_bytes=65536)  # our Close frame
    assert h.server.data_to_send(world.conn, max_bytes=65536) is None
    assert h.server.data_to_send(world.conn) is None


def test_pipelined_requests_nobody_reads_keep_the_answers_bounded() -> None:
    """A client that pipelines requests and never reads their answers: once ANSWER_BACKLOG bytes
    of answers wait, the rest of its requests wait unread and its reading pauses; each time the
    answers are taken, the next turn goes on. Every request is answered, in order."""
    h = Harness(clock=FakeClock(START))
    conn = h.accept()
    request = b"GET /tank.js HTTP/1.1\r\nHost: x\r\n\r\n"
    actions = h.feed(conn, request * 100)  # each answer is about 19 KB
    assert PauseReading(conn_id=conn) in actions
    output = h.server._output_of(conn)
    assert output is not None
    assert ANSWER_BACKLOG <= output.control_bytes <= ANSWER_BACKLOG + 32 * 1024
    assert not h.server.turn_wanted  # nothing to do until the answers are taken
    assert h.server.end_turn(h.now, wall_time=h.clock.wall_time) == []  # not taken: still waits
    taken = 0
    for _ in range(100):
        taken += len(h.server.data_to_send(conn) or b"")
        assert h.server.turn_wanted  # taken: go on at the next turn
        actions = h.server.end_turn(h.now, wall_time=h.clock.wall_time)
        waiting = h.server._output_of(conn)
        assert waiting is not None and waiting.control_bytes <= ANSWER_BACKLOG + 32 * 1024
        if ResumeReading(conn_id=conn) in actions:
            break
    taken += len(h.server.data_to_send(conn) or b"")
    one = len(h.http("GET", "/tank.js").body)
    assert taken % 100 == 0 and taken // 100 > one  # 100 answers of the same size: all answered
    assert not h.close_asked(conn)
