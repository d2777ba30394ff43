"""Test helpers for the broker link: RESP built by hand, and a driver that plays Redis's part.

No fake Redis server: the tests say which bytes Redis sends (``reply(...)``, ``message(...)``) and
read back the commands the link wrote, parsed with hiredis (a command is a RESP array too).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import hiredis

from tank_core import BrokerConfig
from tank_core.cluster import BrokerLink
from tank_core.cluster.envelope import encode_envelope
from tank_core.cluster.link import Inbound, LinkOutput, LinkState
from tank_core.cluster.vocabulary import BrokerClose, BrokerConnect, BrokerRole, BrokerWrite
from tank_core.notifications import BrokerDown, BrokerGap, BrokerUp
from tank_core.testing import FakeClock

SUB = BrokerRole.SUBSCRIBER
PUB = BrokerRole.PUBLISHER


@dataclass(frozen=True)
class Simple:
    """A simple string reply (``+OK``)."""

    text: str


@dataclass(frozen=True)
class Err:
    """An error reply (``-ERR ...``)."""

    text: str


def reply(value: Any) -> bytes:
    """One RESP2 reply: bytes -> bulk string, int -> integer, None -> nil, list -> array."""
    if isinstance(value, Simple):
        return b"+" + value.text.encode() + b"\r\n"
    if isinstance(value, Err):
        return b"-" + value.text.encode() + b"\r\n"
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        raise TypeError("no booleans in RESP2")
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, str):
        return reply(value.encode())
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(reply(item) for item in value)
    raise TypeError(f"cannot encode {value!r}")


def message(channel: bytes, payload: bytes) -> bytes:
    """A pub/sub push: ``["message", channel, payload]``."""
    return reply([b"message", channel, payload])


def envelope(
    kind: bytes, origin: str, seq: int, payload: bytes, exclude: int | None = None
) -> bytes:
    return encode_envelope(kind, origin.encode(), seq, exclude, payload)


def parse_commands(data: bytes) -> list[list[bytes]]:
    reader = hiredis.Reader()
    reader.feed(data)
    out: list[list[bytes]] = []
    while (command := reader.gets()) is not False:
        assert isinstance(command, list), command
        out.append(command)
    return out


class Driver:
    """A ``BrokerLink`` on a fake clock; the test plays Redis and the adapter.

    On the publishing connection every command is logged until answered, in order; PUBSUB NUMSUB
    queries are answered by the driver itself (``members``) as soon as they head the pipeline.
    """

    def __init__(self, config: BrokerConfig | None = None, *, seed: int = 0) -> None:
        self.clock = FakeClock(seed=seed)
        self.link = BrokerLink(config if config is not None else BrokerConfig(), rng=random.Random(seed))
        self.outputs: list[LinkOutput] = []
        self.written: dict[BrokerRole, bytearray] = {SUB: bytearray(), PUB: bytearray()}
        self.connects: list[BrokerConnect] = []
        self.closes: list[BrokerClose] = []
        self.answers: list[tuple[int, str]] = []
        #: Commands written on the publishing connection and not answered yet, in order.
        self.pub_log: list[list[bytes]] = []
        self._pub_unseen: list[list[bytes]] = []
        #: What Redis answers to PUBSUB NUMSUB {prefix}:all.
        self.members = 1
        self._answering = False

    # -- the adapter's part

    @property
    def now(self) -> float:
        return self.clock.now

    @property
    def wall(self) -> float:
        return self.clock.wall_time

    def run(self, outputs: list[LinkOutput] | list[BrokerWrite | BrokerClose]) -> list[Any]:
        out = list(outputs)
        for item in out:
            if isinstance(item, BrokerConnect):
                self.connects.append(item)
                if item.role is PUB:
                    self.pub_log.clear()  # a new connection: nothing of the old one is answered
                    self._pub_unseen.clear()
            elif isinstance(item, BrokerClose):
                self.closes.append(item)
            elif isinstance(item, BrokerWrite):
                if item.generation == self.link.generation:
                    self.written[item.role] += item.data
            else:
                self.outputs.append(item)
        for write in self.link.take_writes():
            assert write.generation == self.link.generation
            self.written[write.role] += write.data
        self.answers += self.link.take_answers()
        self._collect_pub()
        if not self._answering:
            self._answering = True
            try:
                while self.pub_log and self.pub_log[0][0] == b"PUBSUB":
                    self.pub_log.pop(0)
                    self.feed(PUB, reply([self.link.channels.all, self.members]))
            finally:
                self._answering = False
        return out

    def _collect_pub(self) -> None:
        if self.written[PUB]:
            new = parse_commands(bytes(self.written[PUB]))
            self.written[PUB].clear()
            self.pub_log += new
            self._pub_unseen += new

    def start(self) -> list[Any]:
        return self.run(self.link.start(now=self.now, wall_time=self.wall))

    def open(self, role: BrokerRole) -> list[Any]:
        return self.run(
            self.link.opened(role, self.link.generation, now=self.now, wall_time=self.wall)
        )

    def feed(self, role: BrokerRole, data: bytes) -> list[Any]:
        return self.run(
            self.link.received(role, self.link.generation, data, now=self.now, wall_time=self.wall)
        )

    def lose(self, role: BrokerRole, error: str | None = None) -> list[Any]:
        return self.run(
            self.link.closed(
                role, self.link.generation, now=self.now, wall_time=self.wall, error=error
            )
        )

    def tick(self) -> list[Any]:
        return self.run(self.link.tick(self.now, wall_time=self.wall))

    def advance(self, seconds: float) -> list[Any]:
        """Move the clock, ticking at each deadline on the way (as an adapter's timer would)."""
        target = self.now + seconds
        out: list[Any] = []
        while (deadline := self.link.next_deadline()) is not None and deadline <= target:
            self.clock.jump_to(deadline)
            out += self.tick()
        self.clock.jump_to(target)
        out += self.tick()
        return out

    def publish(
        self, kind: bytes, channel: bytes, payload: bytes, *, token: int | None = None,
        exclude: int | None = None,
    ) -> bool:
        pending = self.link.publish(kind, channel, payload, exclude=exclude, token=token, now=self.now)
        self.run([])
        return pending

    # -- Redis's part

    def commands(self, role: BrokerRole) -> list[list[bytes]]:
        """What the link wrote on ``role`` since the last call, as commands (on the publishing
        connection, without the PUBSUB NUMSUB queries the driver answers itself)."""
        if role is PUB:
            self.run([])
            new, self._pub_unseen = self._pub_unseen, []
            return [command for command in new if command[0] != b"PUBSUB"]
        data = bytes(self.written[role])
        self.written[role].clear()
        return parse_commands(data)

    def answer_pub(self, count: int | None = None, value: Any = 1) -> list[list[bytes]]:
        """Answer the publishing connection in order, up to the ``count``-th PUBLISH (all when
        None): each PUBLISH with ``value``, the rest as Redis would."""
        self.run([])
        answered: list[list[bytes]] = []
        data = b""
        while self.pub_log and (count is None or len(answered) < count):
            command = self.pub_log.pop(0)
            if command[0] == b"PUBLISH":
                answered.append(command)
                data += reply(value)
            elif command[0] == b"PUBSUB":
                data += reply([self.link.channels.all, self.members])
            else:
                data += reply(Simple("OK"))
        if data:
            self.feed(PUB, data)
        return answered

    def ack_publishes(self, count: int | None = None) -> list[list[bytes]]:
        """Acknowledge the PUBLISH commands written (all, or the first ``count``), in order."""
        return self.answer_pub(count)

    def answer_handshake(self) -> None:
        """Answer AUTH/SELECT with +OK and confirm every SUBSCRIBE, as Redis would."""
        self.run([])
        while self.pub_log and self.pub_log[0][0] in (b"AUTH", b"SELECT"):
            self.pub_log.pop(0)
            self.feed(PUB, reply(Simple("OK")))
        for command in self.commands(SUB):
            if command[0] == b"AUTH":
                self.feed(SUB, reply(Simple("OK")))
            elif command[0] in (b"SUBSCRIBE", b"UNSUBSCRIBE"):
                self.confirm(command)

    def confirm(self, command: list[bytes]) -> None:
        kind = command[0].lower()
        self.feed(SUB, b"".join(reply([kind, channel, n]) for n, channel in enumerate(command[1:], 1)))

    def bring_up(self) -> None:
        if self.link.state is LinkState.IDLE:
            self.start()
        self.open(SUB)
        self.open(PUB)
        self.answer_handshake()
        assert self.link.state is LinkState.UP, self.link.state
        self.events()  # the BrokerUp is the test's business only when it asks

    # -- outputs by type

    def inbound(self) -> list[Inbound]:
        found = [o for o in self.outputs if isinstance(o, Inbound)]
        self.outputs = [o for o in self.outputs if not isinstance(o, Inbound)]
        return found

    def events(self) -> list[BrokerUp | BrokerDown | BrokerGap]:
        found = [o for o in self.outputs if isinstance(o, BrokerUp | BrokerDown | BrokerGap)]
        self.outputs = [o for o in self.outputs if not isinstance(o, BrokerUp | BrokerDown | BrokerGap)]
        return found
