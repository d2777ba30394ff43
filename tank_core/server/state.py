"""The state every part of the server shares, and its output: two lanes per connection.

``ServerState`` holds the wires (one per accepted socket), the engine, the broker link, the output
lanes (``output.py``) and the deadlines of sockets outside the engine. What the engine asks to send
becomes bytes here (``_translate``): a fan-out is framed once and the same ``bytes`` object is
appended to every recipient's data lane (DESIGN.md §3); Pings and Pongs go on the control lane,
which ``MAX_CONTROL_BACKLOG`` bounds. The adapter takes the lanes with ``data_to_send``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason

from .._deadlines import Deadlines
from ..actions import (
    AbortTransport,
    Action,
    CloseTransport,
    EngineAction,
    SendPing,
    SendText,
    SendTextToEach,
    StartClose,
)
from ..cluster.envelope import RELAY
from ..cluster.link import BrokerLink
from ..cluster.vocabulary import BrokerRole
from ..config import ServerConfig
from ..errors import LocalProtocolError
from ..notifications import MessageReceived
from ..wire.connection import MAX_CONTROL_BACKLOG, WireConnection, WireState
from ..wire.frames import ping_frame, text_frame
from ..wire.trace import FrameTracer
from .compression import Compression
from .engine import Engine
from .message_output import Outgoing, OutputReader
from .output import Output, Outputs
from .stats import ServerStats


class ServerState:
    """The shared state of ``TankServer`` and its output lanes."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        rng: random.Random | None = None,
        tracer: FrameTracer | None = None,
        message_notifications: bool = True,
        watch_framed_silence: bool = False,
    ):
        self.config = config if config is not None else ServerConfig()
        #: Whether relay messages (neither a command nor a heartbeat) are reported as
        #: ``MessageReceived``. A session with no hook for them turns this off, and a run of them
        #: in one read is then relayed as one chunk per recipient (``websocket.py``).
        self.message_notifications = message_notifications
        #: Whether connections accepted with ``messages=True`` (ASGI) are closed after
        #: ``heartbeat_timeout`` of silence. Their transport never shows us a Pong, so only
        #: their messages count: right for clients that send heartbeats (tank.js, ours).
        self.watch_framed_silence = watch_framed_silence
        #: Describes every frame in and out of the accepted sockets (``tank serve --log-level
        #: debug``); None costs nothing.
        self.tracer = tracer
        rng = rng if rng is not None else random.Random()
        broker = self.config.broker
        #: The Redis link of a cluster node; None for a single process (the in-memory default).
        self.broker: BrokerLink | None = None if broker is None else BrokerLink(broker, rng=rng)
        self.engine = Engine(self.config, rng=rng, interest=self.broker)
        #: HTTP answers waiting for Redis: token -> (conn_id, what, count).
        self._awaiting: dict[int, tuple[int, str, int]] = {}
        self._next_token = 0
        self._wires: dict[int, WireConnection] = {}
        #: What is waiting to be written, per connection (accepted sockets and Redis links).
        self._outputs = Outputs()
        #: ``tank_core.testing.Harness`` watches what is queued through this (kind, ids, bytes):
        #: kind is "control", "data", "discard" or "close". Checked once per send, not per recipient.
        self._output_observer: Callable[[str, tuple[int, ...], bytes], object] | None = None
        #: The Redis connections of the broker link: conn_id -> (role, generation), and back.
        self._broker_conns: dict[int, tuple[BrokerRole, int]] = {}
        self._broker_ids: dict[tuple[BrokerRole, int], int] = {}
        #: Per-socket deadlines outside the engine: an HTTP request's time limit, or the time a
        #: closing socket has to be reported gone before it is aborted.
        self._request_deadlines = Deadlines()
        # Pacing of input (pacing.py): sockets to resume or go on at the adapter's next turn,
        # sockets paused for their byte rate, and what the limits have met so far.
        self._turn_waiting: dict[int, None] = {}
        self._rate_deadlines = Deadlines()
        #: Limit name -> times it was met (``/metrics``: ``tank_limit_hits_total``), shared with
        #: the engine, which counts the limits on topics.
        self.limit_hits = self.engine.limit_hits
        #: Bytes of unfinished incoming messages held, over all connections.
        self.partial_bytes = 0
        #: WebSocket connections per client address, and the address each one was counted under.
        self._per_address: dict[str, int] = {}
        self._counted_address: dict[int, str] = {}
        self._now = -float("inf")
        #: The latest ``wall_time`` an event or tick brought (copied into notifications).
        self._wall_time = 0.0
        #: ``HttpRequestAnswered`` notifications not yet returned with a call's actions.
        self._answered: list[Action] = []
        #: Connections that agreed permessage-deflate, and their compressed frames.
        self.compression = Compression(self.config.compression_threshold)
        #: Reads output back into messages for transports that frame themselves (ASGI).
        self._output_reader = OutputReader()
        self._next_id = 0
        self.http_requests = 0
        self.messages_dropped = 0
        self._poisoned: BaseException | None = None


    def stats(self) -> ServerStats:
        stats = replace(
            self.engine.stats(),
            http_requests=self.http_requests,
            messages_dropped=self.messages_dropped,
            limit_hits=dict(self.limit_hits),
            partial_bytes=self.partial_bytes,
            compressed_connections=len(self.compression.by_conn),
            messages_compressed=self.compression.messages_compressed,
            compression_bytes_saved=self.compression.bytes_saved,
            history_topics=0 if self.engine.history is None else self.engine.history.topics,
            history_publications=(
                0 if self.engine.history is None else self.engine.history.publications
            ),
        )
        link = self.broker
        if link is None:
            return stats
        return replace(
            stats,
            broker_up=link.up,
            broker_reconnects=link.reconnects,
            broker_gaps=link.gaps,
            broker_missed=link.missed,
            broker_buffered=link.buffered,
            broker_dropped=link.dropped,
            broker_duplicates=link.duplicates,
            broker_published=link.published,
            broker_received=link.received_messages,
            broker_nodes=link.members or 0,
            broker_nodes_expected=link.expected_members,
        )

    # ------------------------------------------------------------------ output

    @property
    def output_waiting(self) -> bool:
        """Whether ``take_ready()`` would name any connection (a cheap test after each batch)."""
        return bool(self._outputs.ready)

    def take_ready(self) -> list[int]:
        """The connections given something to write (or to close) since the last call, each once.

        Call it after each batch of calls into the core (or once per loop iteration), then
        ``data_to_send`` for each whose socket can be written now; the others keep their bytes here
        until it can. Everything queued meanwhile leaves in one write."""
        return self._outputs.take_ready()

    def data_to_send(self, conn_id: int, max_bytes: int | None = None) -> bytes | None:
        """Take what is waiting for ``conn_id``: control frames first, then whole data frames
        (about ``max_bytes`` of them when given), as one ``bytes`` to write now. The bytes count as
        sent from here on. ``b""``: nothing to write. None: nothing more will ever come; close the
        transport once what was taken before is written (the core asks for an abort itself if it
        is not reported gone within ``close_timeout``)."""
        output = self._outputs.by_id.get(conn_id)
        if output is None:
            return None
        data = output.data
        if not data and not output.control:
            return None if output.closing else b""
        if output.control or max_bytes is not None:
            taken, data_bytes = output.take(max_bytes)
        else:
            # The fan-out hot path: data frames only, all of them.
            output.data = []
            taken = data[0] if len(data) == 1 else b"".join(data)
            data_bytes = len(taken)
        if self.tracer is not None and conn_id in self._wires:
            self.tracer.sent(conn_id, taken)
        self._taken(output, data_bytes)
        return taken

    def _taken(self, output: Output, data_bytes: int) -> None:
        """The adapter took ``data_bytes`` of ``output``'s data lane (and maybe all of it)."""
        account = output.account
        if account is not None and data_bytes:
            left = account.outbox - data_bytes
            account.outbox = left if left > 0 else 0
        if output.watch and not output.control and not output.data:
            output.watch = False
            self._turn_waiting[output.conn_id] = None  # pacing.py: go on at the next turn
        if output.closing:
            self._outputs.mark(output)  # the next call says None: close it

    def messages_to_send(self, conn_id: int) -> tuple[Outgoing, ...] | None:
        """``data_to_send`` for a connection accepted with ``messages=True``, read back into
        messages (``message_output.py``): ``()`` when nothing waits, None when nothing more will
        ever come (the transport ends the connection)."""
        output = self._outputs.by_id.get(conn_id)
        if output is None:
            return None
        if not output.data and not output.control:
            return None if output.closing else ()
        control, chunks = output.control, output.data
        output.control, output.control_bytes, output.data = [], 0, []
        read = self._output_reader.read
        # Each data chunk is read on its own: a fan-out's chunk is one object shared by every
        # recipient, read back once for all of them.
        messages: list[Outgoing] = []
        for chunk in control:
            messages += read(chunk, shared=False)
        data_bytes = 0
        for chunk in chunks:
            data_bytes += len(chunk)
            messages += read(chunk)
        self._taken(output, data_bytes)
        return tuple(messages)

    def _output_of(self, conn_id: int) -> Output | None:
        return self._outputs.by_id.get(conn_id)

    def _queue(self, conn_id: int, data: bytes, *, control: bool) -> None:
        output = self._outputs.by_id.get(conn_id)
        if output is None or output.closing:
            return
        if control:
            output.control.append(data)
            output.control_bytes += len(data)
        else:
            output.data.append(data)
        self._outputs.mark(output)
        if self._output_observer is not None:
            self._output_observer("control" if control else "data", (conn_id,), data)

    def _append_to_each(
        self,
        conn_ids: list[int] | tuple[int, ...],
        chunk: bytes,
        frames: tuple[bytes, ...],
        payloads: tuple[bytes, ...] | list[bytes],
    ) -> None:
        """The fan-out hot path: one shared ``chunk`` (the ``frames`` of ``payloads``, joined),
        one append per recipient; connections that agreed compression get theirs."""
        if self.compression.by_conn:
            conn_ids = self._append_compressed(conn_ids, chunk, payloads)
        outputs = self._outputs
        by_id = outputs.by_id
        ready = outputs.ready
        this_round = outputs.round
        if self._output_observer is not None:
            ids = tuple(c for c in conn_ids if c in by_id)
            for frame in frames:
                self._output_observer("data", ids, frame)
        get = by_id.get
        for conn_id in conn_ids:
            output = get(conn_id)
            if output is None:
                continue
            output.data.append(chunk)
            if output.listed != this_round:
                output.listed = this_round
                ready.append(conn_id)

    def _append_compressed(
        self,
        conn_ids: list[int] | tuple[int, ...],
        chunk: bytes,
        payloads: tuple[bytes, ...] | list[bytes],
    ) -> list[int]:
        """Give the compressing recipients the run compressed (once per window size); returns
        the others. Their outbox was charged the plain size: the difference is given back."""
        compression = self.compression
        plain, groups = compression.split(conn_ids)
        outputs = self._outputs
        by_id = outputs.by_id
        for window, ids in groups.items():
            frames = compression.frames(payloads, window)
            if frames is None:
                plain += ids
                continue
            group_chunk = frames[0] if len(frames) == 1 else b"".join(frames)
            saved = len(chunk) - len(group_chunk)
            if self._output_observer is not None:
                present = tuple(c for c in ids if c in by_id)
                for frame in frames:
                    self._output_observer("data", present, frame)
            this_round = outputs.round
            ready = outputs.ready
            given = 0
            for conn_id in ids:
                output = by_id.get(conn_id)
                if output is None:
                    continue
                output.data.append(group_chunk)
                if output.listed != this_round:
                    output.listed = this_round
                    ready.append(conn_id)
                account = output.account
                if account is not None:
                    left = account.outbox - saved
                    account.outbox = left if left > 0 else 0
                given += 1
            compression.bytes_saved += saved * given
        return plain

    def _queue_text(self, conn_id: int, payload: bytes, frame: bytes) -> None:
        """One text message to one connection: ``frame``, or its compressed form if agreed."""
        window = self.compression.by_conn.get(conn_id) if self.compression.by_conn else None
        if window is not None:
            frames = self.compression.frames((payload,), window)
            if frames is not None:
                output = self._outputs.by_id.get(conn_id)
                saved = len(frame) - len(frames[0])
                if output is not None and output.account is not None:
                    output.account.outbox = max(0, output.account.outbox - saved)
                self.compression.bytes_saved += saved
                frame = frames[0]
        self._queue(conn_id, frame, control=False)

    def _close_output(self, conn_id: int) -> None:
        output = self._outputs.by_id.get(conn_id)
        if output is not None and not output.closing:
            output.closing = True
            self._outputs.mark(output)
            if self._output_observer is not None:
                self._output_observer("close", (conn_id,), b"")


    def _linger(self, conn_id: int) -> None:
        """Close once written; the socket has ``close_timeout`` to be reported gone."""
        wire = self._wires.get(conn_id)
        if wire is not None and wire.state is not WireState.CLOSED:
            self._release_held(wire)
            wire.release()
            self._request_deadlines.set(conn_id, self._now + self.config.close_timeout)
        self._close_output(conn_id)

    def _forget_wire(self, conn_id: int) -> None:
        if self.tracer is not None:
            self.tracer.forget(conn_id)
        wire = self._wires.pop(conn_id, None)
        if wire is not None:
            self._release_held(wire)
        self._uncount_address(conn_id)
        self.compression.discard(conn_id)
        self._outputs.by_id.pop(conn_id, None)
        self._request_deadlines.discard(conn_id)
        self._rate_deadlines.discard(conn_id)
        self._turn_waiting.pop(conn_id, None)

    def _take_answered(self) -> list[Action]:
        """The ``HttpRequestAnswered`` notifications not yet returned, to return with a call."""
        answered, self._answered = self._answered, []
        return answered

    def _release_held(self, wire: WireConnection) -> None:
        """The socket's unfinished message is gone: it no longer counts in ``partial_bytes``."""
        if wire.held:
            self.partial_bytes -= wire.held
            wire.held = 0
        wire.assembler.parts = []
        wire.assembler.size = 0

    def _count_address(self, conn_id: int, address: str) -> None:
        self._counted_address[conn_id] = address
        self._per_address[address] = self._per_address.get(address, 0) + 1

    def _uncount_address(self, conn_id: int) -> None:
        address = self._counted_address.pop(conn_id, None)
        if address is not None:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]


    # ------------------------------------------------------------------ engine -> bytes

    def _translate(self, engine_actions: list[EngineAction]) -> list[Action]:
        """Carry out the engine's sends on the output lanes; pass on what the adapter must do."""
        actions: list[Action] = []
        append = actions.append
        by_id = self._outputs.by_id
        # The same payload object (a text heartbeat, one relay) is framed once per batch.
        last_payload: bytes | None = None
        last_frame = b""
        last_ping: bytes | None = None
        last_ping_frame = b""
        for action in engine_actions:
            match action:
                case SendTextToEach(conn_ids=conn_ids, payload=payload):
                    frame = text_frame(payload)
                    self._append_to_each(conn_ids, frame, (frame,), (payload,))
                case SendText(conn_id=conn_id, payload=payload):
                    if payload is not last_payload:
                        last_payload, last_frame = payload, text_frame(payload)
                    self._queue_text(conn_id, payload, last_frame)
                case SendPing(conn_id=conn_id, payload=payload):
                    output = by_id.get(conn_id)
                    if output is None or output.control_bytes >= MAX_CONTROL_BACKLOG:
                        continue  # a peer that reads nothing gets no more Pings: it will time out
                    if payload is not last_ping:
                        last_ping, last_ping_frame = payload, ping_frame(payload)
                    self._queue(conn_id, last_ping_frame, control=True)
                case StartClose(
                    conn_id=conn_id, code=code, reason=reason, discard_pending=discard
                ):
                    wire = self._wires.get(conn_id)
                    if wire is None or wire.ws is None:
                        continue
                    output = by_id.get(conn_id)
                    if discard and output is not None:
                        output.data = []  # bytes already taken are the adapter's to finish
                        if self._output_observer is not None:
                            self._output_observer("discard", (conn_id,), b"")
                    # wsproto tests `is CloseReason.NO_STATUS_RCVD` and turns a plain 1005 into 1000
                    # (wsproto #182): pass the enum member to get the empty body the peer sent.
                    close_code = CloseReason.NO_STATUS_RCVD if code is None else code
                    frame = wire.ws.send(CloseConnection(code=close_code, reason=reason or None))
                    self._queue(conn_id, bytes(frame), control=False)
                case CloseTransport(conn_id=conn_id):
                    self._linger(conn_id)
                case AbortTransport(conn_id=conn_id):
                    self._forget_wire(conn_id)
                    append(action)
                case MessageReceived(conn_id=conn_id, data=data):
                    if self.broker is not None and self.config.relay:
                        # PROTOCOL.md case 4 on every node; the sender is on this one only.
                        self.broker.publish(
                            RELAY, self.broker.channels.all, data, exclude=conn_id, now=self._now
                        )
                    if self.message_notifications:
                        append(action)
                case _:
                    append(action)
        return actions


    def _check_poison(self) -> None:
        if self._poisoned is not None:
            raise LocalProtocolError(
                "the server failed earlier and cannot be used; see the chained exception"
            ) from self._poisoned
