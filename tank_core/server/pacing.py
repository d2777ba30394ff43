"""Pacing each socket's input, so that no peer takes more than its share (``ServerConfig.limits``).

Reading a socket is paused for reasons and resumed once none is left, so that reasons never undo
each other: ``PAUSE_AUTH`` while the application judges its upgrade, ``PAUSE_ANSWER`` while a
cluster API call waits for Redis, ``PAUSE_PIPELINE`` while HTTP answers wait to be taken,
``PAUSE_TURN`` once its input passed ``input_budget`` since it last yielded (resumed at the
adapter's next loop turn, ``end_turn``), ``PAUSE_RATE`` while it is over
``max_input_bytes_per_second`` (resumed by ``tick``). Bytes already handed to the core are always
handled: a pause only stops more from being read. Over ``max_frames_per_second`` a connection is
closed 1008; the process-wide bytes of unfinished messages past ``max_partial_bytes`` close the
connection that would pass it with 1013.
"""

from __future__ import annotations

import math
from abc import abstractmethod

from ..actions import Action, PauseReading, ResumeReading
from ..wire.connection import WireConnection, WireState
from .state import ServerState

__all__ = [
    "PAUSE_ANSWER",
    "PAUSE_AUTH",
    "PAUSE_PIPELINE",
    "PAUSE_RATE",
    "PAUSE_TURN",
    "InputPacing",
]

PAUSE_AUTH = 1
PAUSE_ANSWER = 2
PAUSE_PIPELINE = 4
PAUSE_TURN = 8
PAUSE_RATE = 16


class InputPacing(ServerState):
    """Pauses, turns, rates and the process-wide bound on unfinished messages."""

    # ------------------------------------------------------------------ pausing for reasons

    def _pause(self, wire: WireConnection, reason: int, actions: list[Action]) -> None:
        if not wire.paused:
            actions.append(PauseReading(conn_id=wire.conn_id))
        wire.paused |= reason

    def _resume(self, wire: WireConnection, reason: int, actions: list[Action]) -> None:
        if wire.paused & reason:
            wire.paused &= ~reason
            if not wire.paused and wire.state is not WireState.CLOSED:
                actions.append(ResumeReading(conn_id=wire.conn_id))

    # ------------------------------------------------------------------ turns

    @property
    def turn_wanted(self) -> bool:
        """Whether ``end_turn`` has work: call it once at the start of the next loop turn."""
        return bool(self._turn_waiting)

    def end_turn(self, now: float, *, wall_time: float) -> list[Action]:
        """The adapter's loop turn is over (the others had theirs): sockets that yielded read
        again, and HTTP sockets whose answers were taken go on with their pipelined requests."""
        self._check_poison()
        if now > self._now:
            self._now = now
        self._wall_time = wall_time
        waiting, self._turn_waiting = self._turn_waiting, {}
        actions: list[Action] = []
        try:
            for conn_id in waiting:
                wire = self._wires.get(conn_id)
                if wire is None or wire.state is WireState.CLOSED:
                    continue
                was_paused = wire.paused
                if wire.backlog and wire.state is WireState.WEBSOCKET:
                    self._next_budget(wire, now, wall_time, actions)  # paused until it is done
                else:
                    wire.paused &= ~PAUSE_TURN
                if wire.paused & PAUSE_PIPELINE and self._answers_taken(conn_id):
                    wire.paused &= ~PAUSE_PIPELINE
                    actions += self._drive_http(wire, now, wall_time)  # may pause it again
                if was_paused and not wire.paused and wire.live:
                    actions.append(ResumeReading(conn_id=conn_id))
        except Exception as exc:  # a bug of ours in shared state: stop serving (DESIGN.md §4)
            self._poisoned = exc
            raise
        if self.broker is not None:
            actions += self._drain_broker(now, wall_time)  # relays and API calls handled here
        return actions + self._take_answered()

    def _yield_turn(self, wire: WireConnection, actions: list[Action]) -> None:
        self._pause(wire, PAUSE_TURN, actions)
        self._turn_waiting[wire.conn_id] = None

    def _paced_websocket_bytes(
        self, wire: WireConnection, data: bytes, now: float, wall_time: float
    ) -> list[Action]:
        """Bytes of an upgraded socket, at most one budget of them per turn: the rest waits in
        ``backlog`` for ``end_turn``."""
        if wire.backlog:
            # Still working through earlier input, turn by turn (this read was on its way when
            # reading paused): it waits its turn behind the rest.
            wire.backlog += data
            return []
        room = self.config.limits.input_budget - wire.turn_bytes
        if len(data) > room:
            data, wire.backlog = data[:room], data[room:]
        waiting = len(wire.backlog)
        actions = self._websocket_bytes(wire, data, now, wall_time)
        if wire.live:
            # Only what was handled counts: frames past the turn's cap went back to the backlog.
            self._input_handled(wire, len(data) - (len(wire.backlog) - waiting), now, actions)
            if wire.backlog and wire.conn_id not in self._turn_waiting:
                self._hit("input_budget")
                self._yield_turn(wire, actions)  # stopped at the frames of one turn
        return actions

    def _next_budget(
        self, wire: WireConnection, now: float, wall_time: float, actions: list[Action]
    ) -> None:
        """One turn's budget of the input a socket received past its earlier turns. Reading stays
        paused (``PAUSE_TURN`` is set again) while any of it is left."""
        budget = self.config.limits.input_budget
        chunk, wire.backlog = wire.backlog[:budget], wire.backlog[budget:]
        wire.turn_bytes = 0
        waiting = len(wire.backlog)
        actions += self._websocket_bytes(wire, chunk, now, wall_time)
        if not wire.live:
            return
        handled = len(chunk) - (len(wire.backlog) - waiting)
        self._input_handled(wire, handled, now, actions)  # PAUSE_TURN is still set
        if wire.backlog:
            if wire.conn_id not in self._turn_waiting:
                self._hit("input_budget")
            self._turn_waiting[wire.conn_id] = None  # more of it next turn
        elif wire.conn_id not in self._turn_waiting:
            wire.paused &= ~PAUSE_TURN  # all handled, and within the budget

    def _finish_backlog(
        self, wire: WireConnection, now: float, wall_time: float
    ) -> list[Action]:
        """The socket is gone: handle what it sent that still waits, whatever the budget."""
        actions: list[Action] = []
        while wire.backlog and wire.live:
            chunk, wire.backlog = wire.backlog, b""
            actions += self._websocket_bytes(wire, chunk, now, wall_time)
        return actions

    @abstractmethod
    def _drain_broker(self, now: float, wall_time: float) -> list[Action]:
        """The broker link's answers and writes (``cluster.py``)."""

    @abstractmethod
    def _websocket_bytes(
        self, wire: WireConnection, data: bytes, now: float, wall_time: float
    ) -> list[Action]:
        """Frames in (``websocket.py``)."""

    def _answers_taken(self, conn_id: int) -> bool:
        output = self._outputs.by_id.get(conn_id)
        return output is None or not output.control

    @abstractmethod
    def _drive_http(self, wire: WireConnection, now: float, wall_time: float) -> list[Action]:
        """Go on with the requests waiting in h11's buffer (``http.py``)."""

    # ------------------------------------------------------------------ budgets and rates

    def _start_pacing(self, wire: WireConnection, now: float) -> None:
        """A WebSocket begins with full buckets and a whole turn budget."""
        limits = self.config.limits
        wire.turn_bytes = 0
        wire.tokens_at = now
        if limits.max_input_bytes_per_second is not None:
            wire.byte_tokens = 2.0 * self.config.max_message_size
        if limits.max_frames_per_second is not None:
            wire.frame_tokens = 2.0 * limits.max_frames_per_second

    def _refill(self, wire: WireConnection, now: float) -> None:
        elapsed = now - wire.tokens_at
        if elapsed <= 0:
            return
        wire.tokens_at = now
        limits = self.config.limits
        rate = limits.max_input_bytes_per_second
        if rate is not None:
            wire.byte_tokens = min(
                2.0 * self.config.max_message_size, wire.byte_tokens + elapsed * rate
            )
        frames = limits.max_frames_per_second
        if frames is not None:
            wire.frame_tokens = min(2.0 * frames, wire.frame_tokens + elapsed * frames)

    def _input_handled(
        self, wire: WireConnection, size: int, now: float, actions: list[Action]
    ) -> None:
        """``size`` bytes of this socket were handled: its turn budget and its byte rate."""
        limits = self.config.limits
        wire.turn_bytes += size
        if wire.turn_bytes >= limits.input_budget:
            wire.turn_bytes = 0
            self._hit("input_budget")
            self._yield_turn(wire, actions)
        rate = limits.max_input_bytes_per_second
        if rate is None or wire.state is not WireState.WEBSOCKET:
            return
        self._refill(wire, now)
        wire.byte_tokens -= size
        if wire.byte_tokens < 0 and not wire.paused & PAUSE_RATE:
            self._hit("input_rate")
            self._pause(wire, PAUSE_RATE, actions)
            self._rate_deadlines.set(wire.conn_id, now + -wire.byte_tokens / rate)

    @property
    def _frames_per_turn(self) -> int:
        """Frames handled per turn: the budget, at 64 bytes a frame however small it is."""
        return max(1, self.config.limits.input_budget // 64)

    def _frame_allowance(self, wire: WireConnection, now: float) -> float:
        """How many frames this connection may send now before it is over its rate."""
        if self.config.limits.max_frames_per_second is None:
            return math.inf
        self._refill(wire, now)
        return wire.frame_tokens

    def _frames_allowed(self, wire: WireConnection, frames: int, now: float) -> bool:
        """Count ``frames`` frames from this connection; False once it is over its rate."""
        if self.config.limits.max_frames_per_second is None:
            return True
        self._refill(wire, now)
        wire.frame_tokens -= frames
        return wire.frame_tokens >= 0

    def _rates_due(self, now: float, actions: list[Action]) -> None:
        """``tick``: sockets back under their byte rate read again."""
        for conn_id, _due in self._rate_deadlines.pop_due(now):
            wire = self._wires.get(conn_id)
            if wire is not None:
                self._refill(wire, now)
                self._resume(wire, PAUSE_RATE, actions)

    def _hit(self, limit: str) -> None:
        self.limit_hits[limit] = self.limit_hits.get(limit, 0) + 1

    # ------------------------------------------------------------------ unfinished messages

    def _hold(self, wire: WireConnection, size: int) -> bool:
        """``size`` more bytes of an unfinished message; False when the process is over
        ``max_partial_bytes`` (the caller closes this connection with 1013)."""
        wire.held += size
        self.partial_bytes += size
        if self.partial_bytes > self.config.limits.max_partial_bytes:
            self._hit("max_partial_bytes")
            return False
        return True

