"""Property tests for the pure pieces: codec, frames, close codes, config validation, deadlines.

Oracles are independent: the reference's rules written out naively (Go's strict JSON for the
heartbeat object), wsproto's own server-side framing, RFC 6455 §7.4 code ranges, and a dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from wsproto.frame_protocol import FrameProtocol, Opcode

from tank_core import ConfigError, LocalProtocolError, ServerConfig
from tank_core._deadlines import Deadlines
from tank_core.testing import FakeClock, Harness
from tank_core.wire.close_codes import is_sendable_close_code, validate_close_code
from tank_core.wire.codec import (
    ClientHeartbeat,
    Relay,
    Subscribe,
    Unsubscribe,
    classify,
    hello,
    render_topic_message,
)
from tank_core.wire.frames import frame_overhead, ping_frame, pong_frame, text_frame

utf8_text = st.text(st.characters(codec="utf-8"))
any_text = st.text(
    st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
)


# =========================================================================== codec.classify


@given(utf8_text)
def test_sub_recovers_any_topic_exactly(topic: str) -> None:
    assert classify(b"sub:" + topic.encode()) == Subscribe(topic=topic)


@given(utf8_text)
def test_unsub_recovers_any_topic_exactly(topic: str) -> None:
    assert classify(b"unsub:" + topic.encode()) == Unsubscribe(topic=topic)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"sub:", Subscribe(topic="")),
        (b"unsub:", Unsubscribe(topic="")),
        (b"sub::", Subscribe(topic=":")),
        (b"sub:unsub:x", Subscribe(topic="unsub:x")),
        (b"unsub:sub:x", Unsubscribe(topic="sub:x")),
        (b'sub:{"type":"heartbeat"}', Subscribe(topic='{"type":"heartbeat"}')),
        ("sub:新闻".encode(), Subscribe(topic="新闻")),
    ],
)
def test_sub_and_unsub_edge_topics(payload: bytes, expected: object) -> None:
    assert classify(payload) == expected


# JSON values (finite numbers only: NaN/Infinity are not JSON).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    utf8_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(utf8_text, inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def heartbeat_objects(draw: st.DrawFn) -> dict[str, Any]:
    others = draw(st.dictionaries(utf8_text.filter(lambda k: k != "type"), json_values, max_size=5))
    items = list(others.items())
    position = draw(st.integers(0, len(items)))
    items.insert(position, ("type", "heartbeat"))
    return dict(items)


@given(
    heartbeat_objects(),
    st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]),
    st.booleans(),
    st.sampled_from([None, 0, 2]),
    st.sampled_from(["", " ", "\n", "\t\r\n "]),
    st.sampled_from(["", " ", "\n"]),
)
def test_heartbeat_objects_in_any_json_dumps_layout_are_heartbeats(
    obj: dict[str, Any],
    separators: tuple[str, str],
    ensure_ascii: bool,
    indent: int | None,
    lead: str,
    trail: str,
) -> None:
    text = json.dumps(obj, separators=separators, ensure_ascii=ensure_ascii, indent=indent)
    assert classify((lead + text + trail).encode()) == ClientHeartbeat()


def _escape_some(draw: st.DrawFn, s: str) -> str:
    """A JSON string literal for ``s`` with an arbitrary choice of \\uXXXX escapes."""
    out = ['"']
    for char in s:
        code = ord(char)
        if char in '"\\' or code < 0x20:
            out.append(f"\\u{code:04x}")
        elif draw(st.booleans()):
            if code > 0xFFFF:
                high, low = divmod(code - 0x10000, 0x400)
                out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
            else:
                out.append(f"\\u{code:04x}" if draw(st.booleans()) else f"\\u{code:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


@st.composite
def escaped_heartbeat_texts(draw: st.DrawFn) -> str:
    obj = draw(heartbeat_objects())
    members = [
        _escape_some(draw, key) + ":" + json.dumps(value, ensure_ascii=False)
        for key, value in obj.items()
    ]
    return "{" + ",".join(members) + "}"


@given(escaped_heartbeat_texts())
def test_heartbeat_objects_with_any_valid_string_escapes_are_heartbeats(text: str) -> None:
    """Any valid JSON spelling of the object counts (Go decodes escapes in keys and values)."""
    assert json.loads(text)["type"] == "heartbeat"
    assert classify(text.encode()) == ClientHeartbeat()


def _reference_is_heartbeat(payload: bytes) -> bool:
    """The reference: ``json.Unmarshal(message, &map[string]interface{})`` succeeds and
    ``type`` is the string ``heartbeat``. Go's decoder is strict RFC 8259 over UTF-8 bytes."""

    def reject(constant: str) -> None:
        raise ValueError(constant)

    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=reject)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and value.get("type") == "heartbeat"


messages = st.one_of(
    utf8_text,
    json_values.map(json.dumps),
    st.dictionaries(
        st.sampled_from(["type", "Type", "data", "topic"]),
        st.one_of(st.sampled_from(["heartbeat", "Heartbeat", "heartbeat "]), json_values),
    ).map(json.dumps),
    st.builds(
        lambda v: json.dumps({"type": "heartbeat", "v": v}),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
)


@given(messages)
@example('{"type":"heartbeat","v":NaN}')
@example('{"type":"heartbeat","v":-Infinity}')
@example('{"type":"heartbeat","\u7974\u6570":1}'.encode("utf-16-le").decode("utf-8"))
def test_classify_agrees_with_the_reference_on_relays_and_heartbeats(text: str) -> None:
    payload = text.encode()
    assume(not payload.startswith((b"sub:", b"unsub:")))
    expected = ClientHeartbeat() if _reference_is_heartbeat(payload) else Relay()
    assert classify(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b"heartbeat",
        b'"heartbeat"',
        b'["heartbeat"]',
        b'{"type":"Heartbeat"}',
        b'{"type":["heartbeat"]}',
        b'{"type":"heartbeat"',
        b'{"type":"heartbeat"}x',
        b"",
        b" sub:x",
        b"SUB:x",
        b"{" * 100_000,  # deep nesting: no crash
    ],
)
def test_not_heartbeat_objects_are_relays(payload: bytes) -> None:
    assert classify(payload) == Relay()


def test_hello_text() -> None:
    assert hello("bob") == b"Hello, bob! Welcome to WebSocket server."
    assert hello("用户") == "Hello, 用户! Welcome to WebSocket server.".encode()


# =========================================================================== render_topic_message


def _go_model(topic: str, data: str) -> bytes:
    def literal(s: str) -> str:
        dumped = json.dumps(s, ensure_ascii=False)
        return dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    return ('{"topic":' + literal(topic) + ',"data":' + literal(data) + "}").encode()


@given(any_text, any_text)
def test_topic_message_parses_back_and_is_always_valid_utf8(topic: str, data: str) -> None:
    out = render_topic_message(topic, data)
    out.decode("utf-8")  # strict: a text frame must carry valid UTF-8
    value = json.loads(out)
    assert value == {"topic": topic, "data": data}
    assert list(value) == ["topic", "data"]
    assert not any(c in out for c in b"<>&")


@given(utf8_text, utf8_text)
def test_topic_message_is_compact_topic_first_go_escaped(topic: str, data: str) -> None:
    assert render_topic_message(topic, data) == _go_model(topic, data)


def test_topic_message_examples() -> None:
    assert render_topic_message("news", "x") == b'{"topic":"news","data":"x"}'
    assert render_topic_message("a<b", "&>") == b'{"topic":"a\\u003cb","data":"\\u0026\\u003e"}'
    assert render_topic_message("t", "é") == '{"topic":"t","data":"é"}'.encode()
    assert render_topic_message("t", "\ud800<") == b'{"topic":"t","data":"\\ud800\\u003c"}'


# =========================================================================== frames vs wsproto

BOUNDARY_SIZES = [0, 1, 2, 124, 125, 126, 127, 128, 1000, 65534, 65535, 65536, 65537, 70000]


@st.composite
def utf8_payloads(draw: st.DrawFn) -> bytes:
    size = draw(st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 70_000)))
    head = draw(utf8_text).encode()
    if len(head) > size:
        head = head[:size].decode("utf-8", "ignore").encode()
    return head + b"a" * (size - len(head))


def _server_side() -> FrameProtocol:
    return FrameProtocol(client=False, extensions=[])


@given(utf8_payloads())
def test_text_frame_equals_wsproto_server_framing(payload: bytes) -> None:
    frame = text_frame(payload)
    assert frame == bytes(_server_side().send_data(payload.decode("utf-8")))
    assert frame_overhead(len(payload)) == len(frame) - len(payload)
    # And a wsproto client reads it back as the same text.
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(frame)
    received = list(client.received_frames())
    assert len(received) == 1
    assert received[0].opcode is Opcode.TEXT and received[0].message_finished
    assert received[0].payload == payload.decode("utf-8")


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_text_frame_header_lengths_at_the_boundaries(size: int) -> None:
    frame = text_frame(b"a" * size)
    expected_header = 2 if size <= 125 else 4 if size <= 65535 else 10
    assert len(frame) - size == expected_header == frame_overhead(size)
    assert frame[0] == 0x81  # FIN + text, no RSV bits
    assert not frame[1] & 0x80  # RFC 6455 §5.1: a server MUST NOT mask


@given(st.binary(max_size=125))
def test_ping_and_pong_frames_equal_wsproto(payload: bytes) -> None:
    assert ping_frame(payload) == bytes(_server_side().ping(payload))
    assert pong_frame(payload) == bytes(_server_side().pong(payload))


@pytest.mark.parametrize("size", [126, 127, 1000])
def test_control_frames_refuse_more_than_125_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="125"):
        ping_frame(b"p" * size)
    with pytest.raises(ValueError, match="125"):
        pong_frame(b"p" * size)


# =========================================================================== close codes


def _rfc6455_sendable(code: int) -> bool:
    """RFC 6455 §7.4: 0-999 unused; 1000-2999 for the protocol (1004 reserved; 1005, 1006 and
    1015 MUST NOT be sent; only defined codes: §7.4.1 and the IANA registry of §11.7, which adds
    1012-1014); 3000-3999 registered libraries; 4000-4999 private use; 5000+ invalid."""
    defined = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
    return code in defined or 3000 <= code <= 4999


def test_validate_close_code_over_every_int_0_to_5000() -> None:
    wrong = []
    for code in range(5001):
        try:
            validate_close_code(code)
            accepted = True
        except LocalProtocolError as exc:
            accepted = False
            assert str(code) in str(exc)
        if accepted != _rfc6455_sendable(code) or accepted != is_sendable_close_code(code):
            wrong.append(code)
    assert wrong == []


@pytest.mark.parametrize("code", [-1, 5001, 65535, 65536, 10**9])
def test_validate_close_code_out_of_range(code: int) -> None:
    with pytest.raises(LocalProtocolError):
        validate_close_code(code)


@pytest.mark.parametrize("value", [True, False, 1000.0, "1000", None])
def test_validate_close_code_wants_an_int(value: object) -> None:
    with pytest.raises(LocalProtocolError, match="int"):
        validate_close_code(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [1004, 1005, 1006, 1015])
def test_reserved_and_local_only_codes_are_refused(code: int) -> None:
    with pytest.raises(LocalProtocolError, match=str(code)):
        validate_close_code(code)


@given(st.sampled_from([c for c in range(5001) if _rfc6455_sendable(c)]))
def test_every_sendable_code_reaches_the_wire_unchanged(code: int) -> None:
    """wsproto #182: a code must never be rewritten on its way to the wire."""
    h = Harness(ServerConfig(), clock=FakeClock(4096.0))
    peer = h.connect("a")
    h.apply(h.server.close(peer.conn_id, code, "r", now=h.now, wall_time=h.clock.wall_time))
    tail = h.flush(peer.conn_id)
    assert tail == b"\x88\x03" + struct.pack("!H", code) + b"r"


# =========================================================================== ServerConfig


BAD_SETTINGS: list[tuple[str, object]] = [
    ("path", "ws"),
    ("path", ""),
    ("path", 5),
    ("path", "/api/x"),
    ("path", "/metrics"),
    ("path", "/healthz"),
    ("heartbeat_interval", 0),
    ("heartbeat_interval", -1.0),
    ("heartbeat_interval", math.nan),
    ("heartbeat_interval", math.inf),
    ("heartbeat_interval", "5"),
    ("heartbeat_interval", True),
    ("heartbeat_timeout", 0),
    ("heartbeat_timeout", math.nan),
    ("heartbeat_timeout", 5.0),  # == interval
    ("heartbeat_timeout", 4.0),  # < interval
    ("heartbeat_timeout", None),
    ("close_timeout", 0),
    ("close_timeout", -2),
    ("close_timeout", math.inf),
    ("request_timeout", 0),
    ("request_timeout", "10"),
    ("max_message_size", 0),
    ("max_message_size", -1),
    ("max_message_size", 1.5),
    ("max_message_size", True),
    ("max_outbox_bytes", 0),
    ("max_outbox_bytes", "4MiB"),
    ("max_request_size", -5),
    ("allowed_origins", "https://a.example"),
    ("allowed_origins", [1, 2]),
    ("api_key", ""),
    ("api_key", 123),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_config_errors_name_the_field(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        ServerConfig(**{name: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_config_switches_refuse_strings() -> None:
    """``text_heartbeat="false"`` (say, from an environment variable) must not silently mean on."""
    accepted = []
    for name in ("text_heartbeat", "relay", "authenticate"):
        try:
            ServerConfig(**{name: "false"})  # type: ignore[arg-type]
        except ConfigError as exc:
            assert name in str(exc)
        else:
            accepted.append(name)
    assert accepted == [], f"a string was accepted as a switch for {accepted}"


def test_config_allowed_origins_none_is_not_a_crash() -> None:
    """A bad setting is a ``ConfigError`` naming the field (or None means "no restriction");
    never a bare ``TypeError`` from deep inside validation."""
    try:
        config = ServerConfig(allowed_origins=None)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert "allowed_origins" in str(exc)
    else:
        assert not config.allowed_origins


def test_config_is_frozen_and_normalises_origins() -> None:
    config = ServerConfig(allowed_origins=["https://a.example"])  # type: ignore[arg-type]
    assert config.allowed_origins == frozenset({"https://a.example"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.path = "/other"  # type: ignore[misc]
    ServerConfig(heartbeat_interval=0.001, heartbeat_timeout=0.002)  # small but valid


# =========================================================================== Deadlines


class DeadlinesAgainstADict(RuleBasedStateMachine):
    """``Deadlines`` must behave like a dict of key -> deadline, popped earliest first."""

    def __init__(self) -> None:
        super().__init__()
        self.real = Deadlines()
        self.model: dict[int, float] = {}

    keys = st.integers(0, 6)
    times = st.one_of(st.integers(0, 20).map(float), st.floats(0, 20, allow_nan=False))

    @rule(key=keys, when=times)
    def set(self, key: int, when: float) -> None:
        self.real.set(key, when)
        self.model[key] = when

    @rule(key=keys)
    def discard(self, key: int) -> None:
        self.real.discard(key)
        self.model.pop(key, None)

    @rule(now=times)
    def pop_due(self, now: float) -> None:
        expected = {(key, when) for key, when in self.model.items() if when <= now}
        got = self.real.pop_due(now)
        assert len(got) == len(set(got)) and set(got) == expected
        assert [when for _key, when in got] == sorted(when for _key, when in got)  # earliest first
        for key, _when in expected:
            del self.model[key]

    @invariant()
    def agrees(self) -> None:
        earliest = min(self.model.values(), default=None)
        assert self.real.earliest() == earliest
        assert self.real.earliest() == earliest  # pure: asking twice changes nothing
        assert len(self.real) == len(self.model)
        assert sorted(self.real.items()) == sorted(self.model.items())
        for key in range(7):
            assert self.real.get(key) == self.model.get(key)


TestDeadlinesAgainstADict = DeadlinesAgainstADict.TestCase


def test_deadlines_heap_is_rebuilt_when_mostly_stale() -> None:
    deadlines = Deadlines()
    for i in range(10_000):
        deadlines.set(1, float(10_000 - i))  # every set makes the previous entry stale
        deadlines.set(2, float(i))
    assert len(deadlines) == 2
    assert len(deadlines._heap) <= 2 * len(deadlines) + 1000
    assert deadlines.earliest() == 1.0
    assert deadlines.pop_due(math.inf) == [(1, 1.0), (2, 9999.0)]
    assert deadlines.earliest() is None and len(deadlines) == 0


def test_deadlines_pop_due_boundary_is_inclusive() -> None:
    deadlines = Deadlines()
    deadlines.set(7, 5.0)
    assert deadlines.pop_due(math.nextafter(5.0, 0.0)) == []
    assert deadlines.pop_due(5.0) == [(7, 5.0)]
    assert deadlines.pop_due(5.0) == []
