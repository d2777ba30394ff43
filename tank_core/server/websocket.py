"""The WebSocket phase of a socket: frames in, the RFC 6455 duties, messages to the engine.

Complete masked Text, Ping and Pong frames at a frame boundary skip wsproto (``fastpath.py``); the
rest goes through wsproto's frame layer. When nobody is told about relay messages
(``message_notifications`` off, no broker), a run of them in one read is relayed as one chunk.
Pings are answered here, never waiting for the application; messages are assembled and counted
against ``max_message_size`` (1009); a binary message that is not UTF-8 is dropped (PROTOCOL.md
[fix]).
"""

from __future__ import annotations

from wsproto.connection import ConnectionState as WsState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from ..actions import Action
from ..wire.close_codes import MESSAGE_TOO_BIG, NO_STATUS, POLICY_VIOLATION, TRY_AGAIN_LATER
from ..wire.codec import Relay, classify
from ..wire.connection import MAX_CONTROL_BACKLOG, WireConnection, WireState
from ..wire.fastpath import OP_PONG, OP_TEXT, at_frame_boundary, next_frame
from ..wire.frames import pong_frame, text_frame
from ..wire.recovery import classify_opted_in
from .pacing import InputPacing


class WebSocketPhase(InputPacing):
    """Bytes of an upgraded socket."""

    def _websocket_bytes(
        self, wire: WireConnection, data: bytes, now: float, wall_time: float
    ) -> list[Action]:
        engine = self.engine
        conn_id = wire.conn_id
        ws = wire.ws
        assert ws is not None
        engine.touch(conn_id, now)  # any byte is a sign of life, even half a frame
        actions: list[Action] = []
        frames = 0  # counted against max_frames_per_second once the read is handled
        if ws.state is WsState.OPEN and at_frame_boundary(ws) and not wire.assembler.parts:
            # The common frames skip wsproto (fastpath.py); the first other one goes on below.
            pos = 0
            limit = self.config.max_message_size
            # Frames this connection may still send now: past them it is closed at once, not
            # after the rest of this read (max_frames_per_second).
            allowance = self._frame_allowance(wire, now)
            # Small frames cost per frame, not per byte: a turn handles at most this many, and
            # what follows waits in the backlog with the rest (pacing.py).
            per_turn = self._frames_per_turn
            # Relay messages nobody is told about, in a row: relayed as one chunk (_relay_run).
            run: list[bytes] | None = (
                [] if not self.message_notifications and self.broker is None else None
            )
            while frames < per_turn and (frame := next_frame(data, pos, limit)) is not None:
                opcode, payload, pos = frame
                frames += 1
                if frames > allowance:
                    if run:
                        actions += self._relay_run(wire, run, now, wall_time)
                    return self._frames_counted(wire, frames, now, wall_time, actions)
                if opcode == OP_TEXT:
                    kind = classify_opted_in(payload) if wire.recovery else classify(payload)
                    if run is not None and isinstance(kind, Relay):
                        run.append(payload)
                        continue
                    if run:
                        actions += self._relay_run(wire, run, now, wall_time)
                        run = []
                    actions += self._data_fragment(wire, payload, False, True, now, wall_time)
                    if wire.state is not WireState.WEBSOCKET:
                        return actions
                elif opcode == OP_PONG:
                    engine.pong_received(conn_id, payload, now=now)
                else:
                    self._answer_ping(wire, payload, actions)
            if run:
                actions += self._relay_run(wire, run, now, wall_time)
            if frames >= per_turn and pos < len(data):
                wire.backlog = data[pos:] + wire.backlog  # the rest waits for the next turns
                data = data[:pos]
            if pos:
                if pos == len(data):
                    return self._frames_counted(wire, frames, now, wall_time, actions)
                data = data[pos:]
        ws.receive_data(data)
        allowance = self._frame_allowance(wire, now)  # the fast path's frames count against it too
        for event in ws.events():
            if wire.state is not WireState.WEBSOCKET:
                break  # closed by an earlier event of this batch: ignore the rest
            if frames + 1 > allowance:
                frames += 1  # this frame is over the rate: not handled, counted, closed below
                break
            match event:
                case TextMessage(data=text, message_finished=finished, frame_finished=whole):
                    frames += whole
                    chunk = text.encode()
                    actions += self._data_fragment(wire, chunk, False, finished, now, wall_time)
                case BytesMessage(data=raw, message_finished=finished, frame_finished=whole):
                    frames += whole
                    actions += self._data_fragment(wire, bytes(raw), True, finished, now, wall_time)
                case Ping(payload=payload):
                    frames += 1
                    self._answer_ping(wire, bytes(payload), actions)
                case Pong(payload=payload):
                    frames += 1
                    engine.pong_received(conn_id, bytes(payload), now=now)
                case CloseConnection(code=code, reason=reason):
                    if ws.state is WsState.OPEN:
                        # wsproto reports a parse failure as a CloseConnection while still OPEN;
                        # one in permessage-deflate (bad data, 1009 inflated) has its own reason.
                        if wire.deflate is not None and wire.deflate.failure:
                            reason = wire.deflate.failure
                        actions += self._translate(
                            engine.protocol_failed(
                                conn_id, code, reason or "", now=now, wall_time=wall_time
                            )
                        )
                    else:
                        # A registered code wsproto does not know reached it as 1000.
                        known = wire.close_codes.peer_code if wire.close_codes else None
                        peer_code = None if code == NO_STATUS else known or int(code)
                        actions += self._translate(
                            engine.close_received(
                                conn_id, peer_code, reason or "", now=now, wall_time=wall_time
                            )
                        )
                case _:
                    pass
        return self._frames_counted(wire, frames, now, wall_time, actions)

    def _message_arrived(
        self, wire: WireConnection, data: bytes, binary: bool, now: float, wall_time: float
    ) -> list[Action]:
        """A whole message from a transport that frames messages itself (ASGI): one frame for
        the rate, its bytes for the turn budget and the byte rate, then the same rules as a
        final frame read from a socket (1009, UTF-8, the engine)."""
        self.engine.touch(wire.conn_id, now)
        if self._frame_allowance(wire, now) < 1:
            return self._frames_counted(wire, 1, now, wall_time, [])
        actions = self._data_fragment(wire, data, binary, True, now, wall_time)
        actions = self._frames_counted(wire, 1, now, wall_time, actions)
        if wire.state is WireState.WEBSOCKET:
            self._input_handled(wire, len(data), now, actions)
        return actions

    def _frames_counted(
        self, wire: WireConnection, frames: int, now: float, wall_time: float, actions: list[Action]
    ) -> list[Action]:
        """PROTOCOL.md, Limits (ours): over ``max_frames_per_second`` -> close 1008."""
        if frames and wire.state is WireState.WEBSOCKET and not self._frames_allowed(
            wire, frames, now
        ):
            self._hit("max_frames_per_second")
            actions += self._translate(
                self.engine.protocol_failed(
                    wire.conn_id, POLICY_VIOLATION, "rate limit exceeded", now=now,
                    wall_time=wall_time,
                )
            )
        return actions

    def _answer_ping(self, wire: WireConnection, payload: bytes, actions: list[Action]) -> None:
        # RFC 6455 §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
        # response" - answered here, never waiting for the application. A peer that pings and
        # never reads gets no more Pongs past MAX_CONTROL_BACKLOG (§5.5.3: only the latest).
        output = self._outputs.by_id.get(wire.conn_id)
        if (
            output is not None
            and output.control_bytes < MAX_CONTROL_BACKLOG
            and self.engine.is_open(wire.conn_id)
        ):
            self._queue(wire.conn_id, pong_frame(payload), control=True)

    def _relay_run(
        self, wire: WireConnection, run: list[bytes], now: float, wall_time: float
    ) -> list[Action]:
        """Relay messages in a row, framed once and joined: one append per recipient for the
        whole run, where ``message_received`` would take one call and one action per message."""
        frames = tuple(text_frame(payload) for payload in run)
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        targets = self.engine.relay_run(wire.conn_id, len(run), len(chunk), now=now)
        if targets is None:
            # A recipient has no room for the whole run: one at a time closes it at the right one.
            actions: list[Action] = []
            for payload in run:
                actions += self._translate(
                    self.engine.message_received(wire.conn_id, payload, now=now, wall_time=wall_time)
                )
            return actions
        if targets:
            self._append_to_each(targets, chunk, frames, run)
        return []

    def _data_fragment(
        self,
        wire: WireConnection,
        chunk: bytes,
        binary: bool,
        finished: bool,
        now: float,
        wall_time: float,
    ) -> list[Action]:
        if not wire.assembler.add(chunk, binary=binary):
            # PROTOCOL.md, Limits: a message larger than max_message_size -> close 1009.
            reason = f"message larger than {self.config.max_message_size} bytes"
            return self._translate(
                self.engine.protocol_failed(
                    wire.conn_id, MESSAGE_TOO_BIG, reason, now=now, wall_time=wall_time
                )
            )
        if not finished:
            if not self._hold(wire, len(chunk)):
                # Limits: the process holds max_partial_bytes of unfinished messages already.
                return self._translate(
                    self.engine.protocol_failed(
                        wire.conn_id, TRY_AGAIN_LATER, "server busy: try again later",
                        now=now, wall_time=wall_time,
                    )
                )
            return []
        if wire.held:
            self.partial_bytes -= wire.held
            wire.held = 0
        payload = wire.assembler.finish()
        if payload is None:
            # PROTOCOL.md [fix]: a binary message that is not valid UTF-8 is dropped.
            self.messages_dropped += 1
            return []
        return self._translate(
            self.engine.message_received(wire.conn_id, payload, now=now, wall_time=wall_time)
        )
