#!/usr/bin/env python3
"""permessage-deflate (RFC 7692) over real sockets: fan-out cost and a deflate bomb, in one run.

(1) fan-out of 1 KiB market-data JSON to 1,000 subscribers, four configurations, each its own
    server process pinned to CPU 0; one load generator process pinned to CPU 1:

    - ``tank-asyncio-deflate``: ours (``bench/peers/tank_embedded.py``, asyncio on uvloop), the
      subscribers offering ``permessage-deflate; client_max_window_bits``. We always agree
      ``server_no_context_takeover``: each publish is compressed once and the same frame goes to all;
    - ``tank-asyncio-plain``: the same server, the subscribers offering nothing;
    - ``websockets-deflate``: ``bench/peers/websockets_server.py --compression`` (the library's
      default ``compression="deflate"``: context takeover, so one compression per connection);
    - ``tank-trio-deflate``: ours on trio, subscribers offering compression.

    A publisher connection sends ``pub:bench:<D>``; every D is different (sequence number, prices,
    sizes) but all share their structure, as a market-data feed does. At most ``--window`` publishes
    are in flight (default 16). A round publishes for 2 s (0.7 s with ``--quick``; 5 rounds per
    configuration, 3 with ``--quick``, after one warm-up round) and ends when every delivery has arrived:
    deliveries/s = publishes x 1,000 / (last delivery - first publish); server CPU = utime+stime
    (``/proc/PID/stat``) over the same span; wire bytes = what the subscribers read (frame headers
    included) / deliveries. Rounds rotate over the configurations (a noisy neighbour hits all), and the
    ratios are the medians of per-round ratios. The subscribers count frames from their headers only;
    a sample of them keeps every frame and, after each round, inflates it (ours: each message alone,
    with a fresh ``zlib.decompressobj(-15)``; with context takeover: one inflater per connection,
    kept) and checks the JSON's ``data`` is exactly what was published, with no message missing.
(2) deflate bomb: ``python -m tank_cli serve --port 0 --backend B`` (defaults: 1 MiB
    ``max_message_size``), one connection offering compression sends one masked compressed text frame
    inflating to 10,000,000 bytes (~10 KB on the wire). Reported: the close code (must be 1009), and
    the server's RSS growth: ``VmRSS`` before the connection against the largest seen while and after
    sending (sampled every 0.5 ms), and the ``VmHWM`` growth (reset through ``clear_refs`` first).

Usage: ``.venv/bin/python bench/compression_bench.py [--quick] [--only fanout,bomb]
[--configs a,b] [--profile]``. Results also go to ``bench/results/compression_bench.json``. See
``bench/README.md``. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import platform
import pstats
import random
import re
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_bench import (  # a sibling script, not a package
    LOAD_CPU,
    PEERS,
    PYTHON,
    SERVER_CPU,
    ServerProcess,
    _git_commit,
    _version,
    client_frame,
    fmt,
    log,
    proc_times,
    proc_wait,
    raise_fd_limit,
    run_load,
    run_loadgen,
    summary,
    verdict,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compression_bench.json"
HOST = "127.0.0.1"
TOPIC = "bench"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
OFFER = "permessage-deflate; client_max_window_bits"
TAIL = b"\x00\x00\xff\xff"

CONFIGS = ("tank-asyncio-deflate", "tank-asyncio-plain", "websockets-deflate", "tank-trio-deflate")
LABELS = {
    "tank-asyncio-deflate": "ours asyncio, deflate",
    "tank-asyncio-plain": "ours asyncio, plain",
    "websockets-deflate": "websockets, deflate",
    "tank-trio-deflate": "ours trio, deflate",
}
#: The issue's targets: (numerator, denominator, comparison, bound) on deliveries/s.
TARGETS = (
    ("tank-asyncio-deflate", "websockets-deflate", ">=", 10.0),
    ("tank-asyncio-plain", "tank-asyncio-deflate", "<=", 1.5),
)
BOMB_BYTES = 10_000_000
MAX_MESSAGE_SIZE = 1_048_576  # tank serve's default


def fanout_command(name: str, profile: Path | None) -> list[str]:
    if name.startswith("websockets"):
        return [PYTHON, str(PEERS / "websockets_server.py"), "--host", HOST, "--compression"]
    backend = name.split("-")[1]
    command = [PYTHON, str(PEERS / "tank_embedded.py"), "--host", HOST, "--backend", backend]
    if profile is not None:
        command += ["--profile", str(profile)]
    return command


# --------------------------------------------------------------------------- the messages

_SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "USDCHF", "AUDUSD", "USDCAD", "NZDUSD", "EURGBP", "EURJPY",
            "GBPJPY", "EURCHF", "AUDJPY", "EURAUD", "CHFJPY", "GBPCHF")
_FEED = "fx-majors/top-of-book/london/consolidated/level-1/snapshots-v2"


def data_for(seq: int) -> str:
    """The data of publish ``seq``: 1,024 bytes of JSON, 15 quotes with the same keys, numbers that
    change from one publish to the next (a seeded RNG), ASCII with nothing Go would escape."""
    rng = random.Random(seq)
    quotes = []
    for i, symbol in enumerate(_SYMBOLS):
        mid = 1.0 + (i * 0.37) % 8 + rng.random()
        spread = rng.randint(1, 40) / 100_000
        size = rng.randrange(1_000_000, 10_000_000)
        quotes.append(f'{{"sym":"{symbol}","bid":{mid:.5f},"ask":{mid + spread:.5f},"size":{size}}}')
    ts = 1_700_000_000_000 + 7 * seq
    return f'{{"seq":"{seq:012d}","ts":{ts},"feed":"{_FEED}","quotes":[{",".join(quotes)}]}}'


DATA_BYTES = len(data_for(0))
assert DATA_BYTES == 1024 and len(data_for(10**9)) == DATA_BYTES


def envelope(seq: int) -> bytes:
    return ('{"topic":' + json.dumps(TOPIC) + ',"data":' + json.dumps(data_for(seq)) + "}").encode()


def pub_frame(seq: int) -> bytes:
    return client_frame(f"pub:{TOPIC}:{data_for(seq)}".encode())


def masked_frame(payload: bytes, first: int) -> bytes:
    """A client frame with a random masking key; ``first`` is the first byte (FIN, RSV1, opcode)."""
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def deflate_raw(data: bytes, level: int = 6) -> bytes:
    """RFC 7692 §7.2.1: raw deflate, sync-flushed, the trailing 00 00 ff ff removed."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def request(host: str, port: int, path: str, user_id: str, offer: bool) -> bytes:
    extensions = f"Sec-WebSocket-Extensions: {OFFER}\r\n" if offer else ""
    return (f"GET {path}?user_id={user_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extensions}\r\n").encode()


def read_extension(head: bytes) -> str | None:
    """The Sec-WebSocket-Extensions value of a 101 response, or None."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-extensions":
            return value.strip()
    return None


class Agreement:
    """What a 101 response agreed about permessage-deflate, as the client reads it."""

    def __init__(self, value: str | None) -> None:
        self.value = value
        self.deflate = value is not None and value.split(";")[0].strip().lower() == "permessage-deflate"
        params = [p.strip().lower() for p in (value or "").split(";")[1:]]
        self.no_context = "server_no_context_takeover" in params
        self.window = 15
        for param in params:
            key, _, bits = param.partition("=")
            if key.strip() == "server_max_window_bits":
                self.window = int(bits.strip().strip('"'))


# --------------------------------------------------------------------------- load: fan-out


class Group:
    """One configuration: its server, publisher, subscribers and the state of its rounds."""

    def __init__(self, spec: dict[str, Any], subscribers: int) -> None:
        self.name: str = spec["name"]
        self.pid: int = spec["pid"]
        self.offer: bool = spec["offer"]
        self.tank: bool = spec["name"].startswith("tank-")
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)?$", spec["url"])
        if match is None:
            raise ValueError(f"bad URL {spec['url']!r}")
        self.host, self.port, self.path = match.group(1), int(match.group(2)), match.group(3) or "/"
        self.count = subscribers
        self.publisher: Client | None = None
        self.subscribers: list[Client] = []
        self.checkers: list[Client] = []
        self.lost = 0
        self.frames = 0  # frames completed by all subscribers, since they subscribed
        self.nbytes = 0  # bytes read by all subscribers, since they subscribed
        self.mark: float = float("inf")
        self.base = 0
        self.sent = 0
        self.seq = 0
        self.window = 16
        self.publishing = False
        self.deadline = 0.0
        self.done: asyncio.Future[tuple[float, tuple[float, float]]] | None = None

    def progress(self) -> None:
        subs = self.count
        now = time.perf_counter()
        if self.publishing and now >= self.deadline:
            self.publishing = False
        if self.publishing:
            in_flight = self.sent - (self.frames - self.base) // subs
            k = self.window - in_flight
            if k > 0:
                assert self.publisher is not None and self.publisher.transport is not None
                first = self.seq
                self.publisher.transport.write(b"".join(pub_frame(first + i) for i in range(k)))
                self.seq += k
                self.sent += k
            # back as soon as one more publish has reached every subscriber
            self.mark = self.base + (self.sent - self.window + 1) * subs
            return
        target = self.base + self.sent * subs
        if self.frames >= target:
            self.mark = float("inf")
            if self.done is not None and not self.done.done():
                self.done.set_result((now, proc_times(self.pid)))
        else:
            self.mark = target


class Client(asyncio.Protocol):
    """One raw WebSocket client. A subscriber counts frames from their headers once subscribed; a
    checker also keeps every frame (first byte, payload) for ``verify``."""

    def __init__(self, group: Group, user_id: str, *, subscriber: bool, checker: bool, offer: bool) -> None:
        self.group = group
        self.user_id = user_id
        self.subscriber = subscriber
        self.checker = checker
        self.offer = offer
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.in_http = True
        self.agreement = Agreement(None)
        self.inflater: Any = None  # context takeover: one inflater for the connection's life
        self.counting = False
        self.frames = 0
        self.skip = 0  # bytes left of the frame being read
        self.head = b""  # the start of a frame header split between reads
        self.kept: list[tuple[int, bytes]] = []  # checker: every frame since the last verify
        self.last_seq = -1
        self.checked = 0
        self.compressed = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        g = self.group
        self.transport.write(request(g.host, g.port, g.path, self.user_id, self.offer))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.group.lost += 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost before the Hello: {exc or 'closed'}"))

    def data_received(self, data: bytes) -> None:
        if not self.counting:
            self.buf += data
            self._handshake()
            return
        group = self.group
        n = len(data)
        group.nbytes += n
        if self.checker:
            frames = self._keep(data)
        else:  # the hot path: walk the headers, skip the payloads
            if self.head:
                data = self.head + data
                self.head = b""
                n = len(data)
            pos = self.skip
            frames = 0
            if pos:
                if pos > n:
                    self.skip = pos - n
                    return
                frames = 1
            self.skip = 0
            while pos < n:
                if pos + 2 > n:
                    self.head = data[pos:]
                    break
                length = data[pos + 1]
                if length < 126:
                    end = pos + 2 + length
                elif length == 126:
                    if pos + 4 > n:
                        self.head = data[pos:]
                        break
                    end = pos + 4 + (data[pos + 2] << 8 | data[pos + 3])
                else:
                    if pos + 10 > n:
                        self.head = data[pos:]
                        break
                    end = pos + 10 + int.from_bytes(data[pos + 2:pos + 10], "big")
                if end > n:
                    self.skip = end - n
                    break
                frames += 1
                pos = end
        if frames:
            self.frames += frames
            group.frames += frames
            if group.frames >= group.mark:
                group.progress()

    def _frame(self) -> tuple[int, bytes] | None:
        """The complete frame at the start of ``buf`` (first byte, payload), removed from it."""
        buf = self.buf
        if len(buf) < 2:
            return None
        length, offset = buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, offset = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, offset = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < offset + length:
            return None
        frame = buf[0], bytes(buf[offset:offset + length])
        del buf[:offset + length]
        return frame

    def _frames(self) -> list[tuple[int, bytes]]:
        """Every complete frame at the start of ``buf``, removed from it."""
        out = []
        while (frame := self._frame()) is not None:
            out.append(frame)
        return out

    def _keep(self, data: bytes) -> int:
        self.buf += data
        frames = self._frames()
        self.kept.extend(frames)
        return len(frames)

    def inflate(self, payload: bytes) -> bytes:
        if self.agreement.no_context:
            inflater = zlib.decompressobj(-self.agreement.window)  # each message alone
        else:
            if self.inflater is None:
                self.inflater = zlib.decompressobj(-self.agreement.window)
            inflater = self.inflater
        out = inflater.decompress(payload + TAIL)
        if inflater.unconsumed_tail or inflater.unused_data:
            raise RuntimeError(f"{self.user_id}: trailing bytes after a compressed message")
        return out

    def _handshake(self) -> None:
        buf = self.buf
        if self.in_http:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(f"refused: {bytes(buf[:60])!r}"))
                return
            self.agreement = Agreement(read_extension(bytes(buf[:end])))
            del buf[:end + 4]
            self.in_http = False
        while (frame := self._frame()) is not None:
            first, payload = frame
            if first & 0x0F != 0x1:
                continue
            text = self.inflate(payload) if first & 0x40 else payload
            if not text.startswith(b"Hello, "):
                self.opened.set_exception(ConnectionError(f"first frame {text[:40]!r}"))
                return
            self.opened.set_result(None)
            if self.subscriber:
                assert self.transport is not None
                self.transport.write(client_frame(f"sub:{TOPIC}".encode()))
                self.counting = True
                rest = bytes(buf)
                buf.clear()
                if rest:
                    self.data_received(rest)
            return

    def verify(self) -> None:
        """Checks every kept frame: a final text frame, compressed when agreed (RSV1), inflating to
        ``{"topic":"bench","data":D}`` with D exactly the data of the next publish."""
        for first, payload in self.kept:
            if first & 0x8F != 0x81 or first & 0x30:
                raise RuntimeError(f"{self.user_id}: unexpected frame, first byte {first:#04x}")
            if first & 0x40:
                if not self.agreement.deflate:
                    raise RuntimeError(f"{self.user_id}: RSV1 without permessage-deflate")
                self.compressed += 1
                text = self.inflate(payload)
            else:
                text = payload
            message = json.loads(text)
            data = message["data"]
            seq = int(json.loads(data)["seq"])
            if message["topic"] != TOPIC or data != data_for(seq):
                raise RuntimeError(f"{self.user_id}: message {seq} is not what was published")
            if self.last_seq >= 0 and seq != self.last_seq + 1:
                raise RuntimeError(f"{self.user_id}: got message {seq} after {self.last_seq}")
            self.last_seq = seq
            self.checked += 1
        self.kept.clear()


async def open_clients(group: Group, count: int, make: Callable[[int], Client],
                       concurrency: int = 64) -> list[Client]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Client:
        async with gate:
            client = make(i)
            await loop.create_connection(lambda: client, group.host, group.port)
            await asyncio.wait_for(client.opened, 60)
            return client

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def http_stats(group: Group) -> dict[str, Any]:
    """Our server's ``GET /api/stats`` (loopback needs no key)."""
    reader, writer = await asyncio.open_connection(group.host, group.port)
    writer.write(f"GET /api/stats HTTP/1.1\r\nHost: {group.host}:{group.port}\r\nConnection: close\r\n\r\n"
                 .encode())
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{group.name}: /api/stats answered {head[:40]!r}")
    stats: dict[str, Any] = json.loads(body)
    return stats


async def load_fanout(spec: dict[str, Any]) -> dict[str, Any]:
    subs = spec["subscribers"]
    groups = [Group(s, subs) for s in spec["configs"]]
    every = max(1, subs // spec["checkers"])
    for group in groups:
        t = time.perf_counter()

        def publisher(i: int, g: Group = group) -> Client:
            return Client(g, "publisher", subscriber=False, checker=False, offer=False)

        def subscriber(i: int, g: Group = group) -> Client:
            return Client(g, f"sub{i}", subscriber=True, checker=i % every == 0, offer=g.offer)

        [group.publisher] = await open_clients(group, 1, publisher)
        group.subscribers = await open_clients(group, subs, subscriber)
        group.checkers = [s for s in group.subscribers if s.checker]
        agreed = sum(s.agreement.deflate for s in group.subscribers)
        if agreed != (subs if group.offer else 0):
            raise RuntimeError(f"{group.name}: {agreed} of {subs} subscribers agreed permessage-deflate")
        log(f"  {group.name}: {subs} subscribers + 1 publisher open in {time.perf_counter() - t:.1f} s; "
            f"answer: {group.subscribers[0].agreement.value!r}")
    # No acknowledgement exists for sub:, so publish until every subscriber has seen one message.
    for group in groups:
        assert group.publisher is not None and group.publisher.transport is not None
        t = time.perf_counter()
        while min(s.frames for s in group.subscribers) < 1:
            if time.perf_counter() - t > 30:
                raise RuntimeError(f"{group.name}: subscriptions not effective after 30 s")
            group.publisher.transport.write(pub_frame(group.seq))
            group.seq += 1
            await asyncio.sleep(0.02)
    for group in groups:  # until the last of those publishes has arrived everywhere
        frames, t = -1, time.perf_counter()
        while frames != group.frames:
            if time.perf_counter() - t > 60:
                raise RuntimeError(f"{group.name}: deliveries still arriving after 60 s")
            frames = group.frames
            await asyncio.sleep(0.3)
    for group in groups:
        for checker in group.checkers:
            checker.verify()
        if group.lost:
            raise RuntimeError(f"{group.name}: {group.lost} connections lost")
    agreements = {g.name: g.subscribers[0].agreement.value for g in groups}

    gc.collect()
    gc.freeze()
    gc.disable()  # the load generator's own pauses are not what is measured

    async def one_round(group: Group, seconds: float) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        stats0 = await http_stats(group) if group.tank else None
        for checker in group.checkers:
            checker.verify()  # so that what is kept next is this round's
        before = [s.frames for s in group.subscribers]
        group.base = group.frames
        bytes0 = group.nbytes
        group.sent = 0
        group.done = loop.create_future()
        own0 = time.process_time()
        wait0 = proc_wait(group.pid)
        user0, sys0 = proc_times(group.pid)
        t0 = time.perf_counter()
        group.deadline = t0 + seconds
        group.publishing = True
        group.progress()
        t1, (user1, sys1) = await asyncio.wait_for(group.done, seconds + 120)
        own1 = time.process_time()
        wait1 = proc_wait(group.pid)
        cpu = user1 - user0 + sys1 - sys0
        deliveries = group.sent * subs
        wire = group.nbytes - bytes0
        await asyncio.sleep(0.15)  # nothing more may arrive
        if group.frames != group.base + deliveries or group.nbytes != bytes0 + wire:
            raise RuntimeError(f"{group.name}: {group.frames - group.base} frames, expected {deliveries}")
        for sub, frames in zip(group.subscribers, before, strict=True):
            if sub.frames - frames != group.sent or sub.skip or sub.head:
                raise RuntimeError(f"{group.name}: {sub.user_id} got {sub.frames - frames} messages, "
                                   f"expected {group.sent}")
        compressed0 = sum(c.compressed for c in group.checkers)
        checked0 = sum(c.checked for c in group.checkers)
        for checker in group.checkers:
            checker.verify()
        checked = sum(c.checked for c in group.checkers) - checked0
        compressed = sum(c.compressed for c in group.checkers) - compressed0
        if checked != group.sent * len(group.checkers):
            raise RuntimeError(f"{group.name}: checked {checked} messages for {group.sent} publishes "
                               f"on {len(group.checkers)} subscribers")
        if compressed != (checked if group.offer else 0):
            raise RuntimeError(f"{group.name}: {compressed} of {checked} checked messages were compressed")
        if group.lost:
            raise RuntimeError(f"{group.name}: {group.lost} connections lost")
        elapsed = t1 - t0
        sample = {
            "publishes": group.sent,
            "deliveries": deliveries,
            "seconds": elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "server_cpu_s": cpu,
            "server_cpu_s_per_1000": cpu / deliveries * 1000,
            "server_user_s_per_1000": (user1 - user0) / deliveries * 1000,
            "server_sys_s_per_1000": (sys1 - sys0) / deliveries * 1000,
            "wire_bytes_per_delivery": wire / deliveries,
            "server_cpu_pct": cpu / elapsed * 100,
            "server_wait_pct": (wait1 - wait0) / elapsed * 100,
            "loadgen_cpu_pct": (own1 - own0) / elapsed * 100,
            "checked_messages": checked,
            "checked_compressed": compressed,
        }
        if stats0 is not None:
            stats1 = await http_stats(group)
            sample["server_messages_compressed"] = (
                stats1["messages_compressed"] - stats0["messages_compressed"])
            sample["server_bytes_saved_per_delivery"] = (
                stats1["compression_bytes_saved"] - stats0["compression_bytes_saved"]) / deliveries
            sample["server_compressed_connections"] = stats1["compressed_connections"]
        return sample

    samples: dict[str, list[dict[str, float]]] = {g.name: [] for g in groups}
    for group in groups:  # warm-up, not recorded
        group.window = spec["window"]
        await one_round(group, spec["warmup"])
    for rep in range(spec["reps"]):
        order = groups[rep % len(groups):] + groups[:rep % len(groups)]
        for group in order:
            sample = await one_round(group, spec["seconds"])
            samples[group.name].append(sample)
            log(f"  round {rep + 1}/{spec['reps']} {group.name:<21} {sample['deliveries_per_s']:>9,.0f} "
                f"deliveries/s  {sample['server_cpu_s_per_1000'] * 1000:6.2f} ms CPU/1000  "
                f"{sample['wire_bytes_per_delivery']:6.0f} B/delivery  server CPU "
                f"{sample['server_cpu_pct']:3.0f} % (waiting {sample['server_wait_pct']:3.0f} %)  "
                f"load CPU {sample['loadgen_cpu_pct']:3.0f} %")
            await asyncio.sleep(0.1)
    for group in groups:
        for client in [group.publisher, *group.subscribers]:
            if client is not None and client.transport is not None and not client.lost:
                client.transport.abort()
    gc.enable()
    return {"samples": samples, "agreements": agreements,
            "checked_per_config": {g.name: sum(c.checked for c in g.checkers) for g in groups},
            "checkers": len(groups[0].checkers) if groups else 0}


def loadgen_main(spec_text: str) -> int:
    return run_load(load_fanout, spec_text)


# --------------------------------------------------------------------------- orchestration: fan-out


def bench_fanout(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    log(f"(1) fan-out: starting {', '.join(opts.configs)}")
    servers: list[ServerProcess] = []
    profiles: dict[str, Path] = {}
    try:
        for name in opts.configs:
            profile = None
            if opts.profile and name.startswith("tank-"):
                profile = profiles[name] = opts.out.parent / f"profile-compression-{name}.pstats"
                profile.parent.mkdir(parents=True, exist_ok=True)
            servers.append(ServerProcess(name, fanout_command(name, profile)))
        spec = {
            "configs": [{"name": s.name, "url": s.url, "pid": s.pid, "offer": not s.name.endswith("-plain")}
                        for s in servers],
            "subscribers": opts.subscribers,
            "checkers": opts.checkers,
            "reps": opts.reps,
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "window": opts.window,
        }
        raw = run_loadgen("fanout", spec, timeout=900, script=__file__)
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited: {server.stderr()}")
    finally:
        for server in servers:
            server.stop()
    result: dict[str, Any] = {
        "subscribers": opts.subscribers,
        "data_bytes": DATA_BYTES,
        "message_bytes": len(envelope(0)),
        "window": opts.window,
        "seconds_per_round": opts.seconds,
        "reps": opts.reps,
        "checkers_per_config": raw["checkers"],
        "checked_messages": raw["checked_per_config"],
        "agreements": raw["agreements"],
        "configs": {},
        "ratios": {},
    }
    samples = raw["samples"]
    for name, rounds in samples.items():
        block = {key: summary([r[key] for r in rounds]) for key in rounds[0]
                 if key not in ("checked_messages", "checked_compressed", "server_compressed_connections")}
        if "server_compressed_connections" in rounds[0]:
            block["server_compressed_connections"] = rounds[-1]["server_compressed_connections"]
        result["configs"][name] = block
    for a, b, _, _ in TARGETS:
        if a in samples and b in samples:
            for key in ("deliveries_per_s", "server_cpu_s_per_1000"):
                values = [x[key] / y[key] for x, y in zip(samples[a], samples[b], strict=True)]
                result["ratios"].setdefault(key, {})[f"{a}/{b}"] = summary(values)
    if "tank-trio-deflate" in samples and "tank-asyncio-deflate" in samples:
        values = [x["deliveries_per_s"] / y["deliveries_per_s"] for x, y in
                  zip(samples["tank-trio-deflate"], samples["tank-asyncio-deflate"], strict=True)]
        result["ratios"]["deliveries_per_s"]["tank-trio-deflate/tank-asyncio-deflate"] = summary(values)
    out["fanout"] = result
    if profiles:
        out["profiles"] = {name: top_functions(path) for name, path in profiles.items()}


def top_functions(path: Path, top: int = 15) -> dict[str, Any]:
    """The functions with the most own time in a tank_embedded.py --profile dump."""
    if not path.exists():
        return {"file": str(path), "error": "no profile written"}
    stats = pstats.Stats(str(path))
    rows = []
    total = stats.total_tt  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename.replace(str(HERE.parent) + '/', '')}:{line}({func})"
        rows.append((tottime, cumtime, calls, where))
    rows.sort(reverse=True)
    return {"file": str(path), "total_s": total,
            "own": [[round(t / max(total, 1e-9), 4), round(c / max(total, 1e-9), 4), n, where]
                    for t, c, n, where in rows[:top]]}


# --------------------------------------------------------------------------- the deflate bomb


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) * 1024
    return values


def reset_hwm(pid: int) -> bool:
    """Resets VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Sampler(threading.Thread):
    """Samples ``VmRSS`` of a process every 0.5 ms; keeps the largest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_rss = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(OSError):
                self.max_rss = max(self.max_rss, proc_status(self.pid)["VmRSS"])
                self.samples += 1
            time.sleep(0.0005)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.max_rss


class RawConnection:
    """A blocking client connection: the handshake offering compression, then frames."""

    def __init__(self, host: str, port: int, path: str, user_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(request(host, port, path, user_id, offer=True).replace(
            KEY.encode(), base64.b64encode(os.urandom(16))))
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"refused: {head[:60]!r}")
        self.agreement = Agreement(read_extension(head))

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def frame(self) -> tuple[int, bytes]:
        """The next frame: (first byte, payload)."""
        while True:
            buf = self.buf
            if len(buf) >= 2:
                length, offset = buf[1] & 0x7F, 2
                if length == 126:
                    length, offset = int.from_bytes(buf[2:4], "big"), 4
                elif length == 127:
                    length, offset = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) >= offset and len(buf) >= offset + length:
                    self.buf = buf[offset + length:]
                    return buf[0], buf[offset:offset + length]
            self._more()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def bomb_one(backend: str) -> dict[str, Any]:
    command = [PYTHON, "-m", "tank_cli", "serve", "--host", HOST, "--port", "0", "--backend", backend]
    server = ServerProcess(f"tank-{backend}", command)
    try:
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)?$", server.url)
        assert match is not None
        host, port, path = match.group(1), int(match.group(2)), match.group(3) or "/"
        # Warm-up: one connection that agrees compression and sends a compressed message inflating
        # to 64 KiB, so first-use costs (lazy imports, the first inflater) are not counted as growth.
        warm = RawConnection(host, port, path, "warmup")
        warm.frame()  # the Hello
        warm.sock.sendall(masked_frame(deflate_raw(b"warm up " * 8192), 0xC1))
        warm.sock.sendall(masked_frame((1000).to_bytes(2, "big"), 0x88))
        with contextlib.suppress(ConnectionError, OSError):
            while warm.frame()[0] & 0x0F != 0x8:
                pass
        warm.close()
        time.sleep(0.5)
        gc.collect()
        bomb = deflate_raw(b"\0" * BOMB_BYTES, level=9)
        frame = masked_frame(bomb, 0xC1)
        before = proc_status(server.pid)
        hwm_reset = reset_hwm(server.pid)
        hwm0 = proc_status(server.pid)["VmHWM"]
        sampler = Sampler(server.pid)
        sampler.start()
        conn = RawConnection(host, port, path, "bomber")
        if not conn.agreement.deflate:
            raise RuntimeError(f"tank-{backend} did not agree permessage-deflate: {conn.agreement.value!r}")
        conn.frame()  # the Hello
        t0 = time.perf_counter()
        conn.sock.sendall(frame)
        code: int | None = None
        reason = ""
        try:
            while True:
                first, payload = conn.frame()
                if first & 0x0F == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    reason = payload[2:].decode(errors="replace")
                    break
        except ConnectionError:
            pass
        close_s = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            conn.sock.sendall(masked_frame((code or 1000).to_bytes(2, "big"), 0x88))
        conn.close()
        time.sleep(0.5)
        max_rss = sampler.stop()
        after = proc_status(server.pid)
        # still serving?
        probe = RawConnection(host, port, path, "probe")
        alive = probe.frame()[1].startswith(b"Hello, ")
        probe.close()
        if server.proc.poll() is not None:
            raise RuntimeError(f"tank-{backend} exited: {server.stderr()}")
    finally:
        server.stop()
    return {
        "backend": backend,
        "agreement": conn.agreement.value,
        "frame_bytes": len(frame),
        "compressed_payload_bytes": len(bomb),
        "inflates_to_bytes": BOMB_BYTES,
        "max_message_size": MAX_MESSAGE_SIZE,
        "close_code": code,
        "close_reason": reason,
        "close_after_s": close_s,
        "rss_before_bytes": before["VmRSS"],
        "rss_max_bytes": max(max_rss, after["VmRSS"]),
        "rss_after_bytes": after["VmRSS"],
        "rss_growth_bytes": max(max_rss, after["VmRSS"]) - before["VmRSS"],
        "hwm_reset": hwm_reset,
        "hwm_before_bytes": hwm0,
        "hwm_after_bytes": after["VmHWM"],
        "hwm_growth_bytes": after["VmHWM"] - hwm0,
        "rss_samples": sampler.samples,
        "server_alive_after": alive,
    }


def bench_bomb(opts: argparse.Namespace, out: dict[str, Any]) -> None:
    results = {}
    for backend in opts.backends:
        log(f"(2) deflate bomb: tank {backend}")
        res = bomb_one(backend)
        log(f"  close {res['close_code']} after {res['close_after_s'] * 1000:.1f} ms, RSS +"
            f"{res['rss_growth_bytes'] / 1024:.0f} KiB, VmHWM +{res['hwm_growth_bytes'] / 1024:.0f} KiB")
        results[backend] = res
    out["bomb"] = results


# --------------------------------------------------------------------------- report


def fmt4(value: float) -> str:
    return f"{value:.4f}"


def mmm(stat: dict[str, Any], form: Any = fmt) -> str:
    return f"{form(stat['median']):>8} [{form(stat['min'])}-{form(stat['max'])}]"


def print_table(res: dict[str, Any]) -> None:
    env = res["environment"]
    print()
    print(f"Compression benchmark: Python {env['python']}, uvloop {env['uvloop']}, trio {env['trio']}, "
          f"websockets {env['websockets']}, {env['cpus']} CPUs, commit {env['commit']}, "
          f"{'quick' if res['quick'] else 'full'} run; server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}; "
          f"load average {env['loadavg_at_start'][0]:.2f} at start, {env['loadavg_at_end'][0]:.2f} at end")
    f = res.get("fanout")
    if f:
        print(f"(1) fan-out to {f['subscribers']:,} subscribers: {f['data_bytes']:,}-byte JSON data, "
              f"{f['message_bytes']:,}-byte messages, at most {f['window']} publishes in flight, "
              f"{f['reps']} rounds of {f['seconds_per_round']:g} s each, interleaved (median [min-max])")
        print(f"  {'':<23}{'deliveries/s':>28}{'server CPU s/1000':>24}{'wire B/delivery':>24}"
              f"{'server CPU %':>22}{'waiting %':>10}{'load CPU %':>11}")
        for name, s in f["configs"].items():
            print(f"  {LABELS[name]:<23}{mmm(s['deliveries_per_s']):>28}"
                  f"{mmm(s['server_cpu_s_per_1000'], fmt4):>24}{mmm(s['wire_bytes_per_delivery']):>24}"
                  f"{mmm(s['server_cpu_pct']):>22}{fmt(s['server_wait_pct']['median']):>10}"
                  f"{fmt(s['loadgen_cpu_pct']['median']):>11}")
        print("  (server CPU s/1000 = utime+stime per 1,000 deliveries; wire bytes include the frame "
              "headers;\n   waiting = runnable while something else had CPU 0; load CPU % near 100 means "
              "the load generator,\n   not the server, set the pace)")
        print("  the servers' answers, and our /api/stats over a round (median):")
        for name, s in f["configs"].items():
            line = f"    {LABELS[name]:<23}{f['agreements'][name] or 'no extension'}"
            if "server_messages_compressed" in s:
                line += (f"; compressed {s['server_messages_compressed']['median']:,.0f} messages for "
                         f"{s['publishes']['median']:,.0f} publishes, {s['server_compressed_connections']:,} "
                         f"compressed connections, {s['server_bytes_saved_per_delivery']['median']:,.0f} "
                         "bytes saved per delivery")
            print(line)
        print(f"  checked (inflated + compared) on {f['checkers_per_config']} subscribers per configuration: "
              + ", ".join(f"{LABELS[n]} {v:,} messages" for n, v in f["checked_messages"].items()))
        spreads = {n: (s["deliveries_per_s"]["max"] - s["deliveries_per_s"]["min"])
                   / s["deliveries_per_s"]["median"] * 100 for n, s in f["configs"].items()}
        print("  noise: deliveries/s spread (max-min)/median: "
              + ", ".join(f"{LABELS[n]} {v:.0f} %" for n, v in spreads.items()))
        busy = {n: sum(v >= 90 for v in s["loadgen_cpu_pct"]["samples"]) for n, s in f["configs"].items()}
        if any(busy.values()):
            print("  rounds with the load generator at >= 90 % CPU (maybe load-bound): "
                  + ", ".join(f"{LABELS[n]} {v}/{f['reps']}" for n, v in busy.items() if v))
        print("  ratios of deliveries/s (median of per-round ratios [min-max]):")
        for pair, stat in f["ratios"].get("deliveries_per_s", {}).items():
            note = ""
            for a, b, op, bound in TARGETS:
                if pair == f"{a}/{b}":
                    ok = stat["median"] >= bound if op == ">=" else stat["median"] <= bound
                    note = f"target {op} {bound:g}: {verdict(ok)}"
            print(f"    {pair:<44}{mmm(stat):>28}  {note}")
        print("  ratios of server CPU per delivery:")
        for pair, stat in f["ratios"].get("server_cpu_s_per_1000", {}).items():
            print(f"    {pair:<44}{mmm(stat):>28}")
    bombs = res.get("bomb")
    if bombs:
        print(f"(2) deflate bomb: one masked compressed text frame inflating to {BOMB_BYTES:,} bytes, "
              f"max_message_size {MAX_MESSAGE_SIZE:,}")
        print(f"  {'':<14}{'frame B':>9}{'close':>7}{'after ms':>10}{'RSS before MiB':>16}{'RSS max MiB':>13}"
              f"{'growth KiB':>12}{'VmHWM growth KiB':>18}{'alive':>7}  verdict")
        for backend, r in bombs.items():
            ok = r["close_code"] == 1009 and max(r["rss_growth_bytes"], r["hwm_growth_bytes"]) < 5 * 2**20
            print(f"  {'ours ' + backend:<14}{r['frame_bytes']:>9,}{r['close_code']!s:>7}"
                  f"{r['close_after_s'] * 1000:>10.1f}{r['rss_before_bytes'] / 2**20:>16.1f}"
                  f"{r['rss_max_bytes'] / 2**20:>13.1f}{r['rss_growth_bytes'] / 1024:>12,.0f}"
                  f"{r['hwm_growth_bytes'] / 1024:>18,.0f}{'yes' if r['server_alive_after'] else 'NO':>7}  "
                  f"close 1009 and < 5 MiB: {verdict(ok)}")
        print("  (RSS before = after a warm-up connection that sent one compressed message; max = largest "
              "of samples\n   every 0.5 ms and the value 0.5 s after; VmHWM reset through clear_refs just "
              "before the bomb connection)")
    profiles = res.get("profiles", {})
    for name, prof in profiles.items():
        print(f"--- cProfile: {LABELS[name]} ({prof.get('file')}), own time share, cumulative share, calls")
        for own, cum, calls, where in prof.get("own", []):
            print(f"    {own:6.1%} {cum:6.1%} {calls:>9}  {where}")
    if profiles:
        print("  (a --profile run: cProfile slows the servers, its figures are not for comparison)")
    print(f"total {res['elapsed_s']:.0f} s; JSON: {res['json']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--only", default="fanout,bomb", help="sections to run: fanout,bomb")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"fan-out configurations (default {','.join(CONFIGS)})")
    parser.add_argument("--backends", default="asyncio,trio", help="deflate bomb backends (default both)")
    parser.add_argument("--window", type=int, default=16, help="publishes in flight at most (default 16)")
    parser.add_argument("--profile", action="store_true",
                        help="run our fan-out servers under cProfile (tank_embedded.py --profile)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.loadgen:
        return loadgen_main(opts.spec)
    opts.configs = [c.strip() for c in opts.configs.split(",") if c.strip()]
    unknown = set(opts.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    opts.backends = [b.strip() for b in opts.backends.split(",") if b.strip()]
    if set(opts.backends) - {"asyncio", "trio"}:
        parser.error("--backends: asyncio, trio")
    if opts.window < 1:
        parser.error("--window wants a positive integer")
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    opts.subscribers = 1000
    opts.checkers = 5
    if opts.quick:
        opts.reps, opts.seconds, opts.warmup = 3, 0.7, 0.3
    else:
        opts.reps, opts.seconds, opts.warmup = 5, 2.0, 0.5
    if len(os.sched_getaffinity(0) | {SERVER_CPU, LOAD_CPU}) > (os.cpu_count() or 1):
        parser.error(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}")
    os.sched_setaffinity(0, {LOAD_CPU})  # this process mostly waits; keep it off the server's CPU
    fd_limit = raise_fd_limit()
    res: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "server_cpu": SERVER_CPU,
            "loadgen_cpu": LOAD_CPU,
            "fd_limit": fd_limit,
            "loadavg_at_start": os.getloadavg(),
            "commit": _git_commit(),
            **{name: _version(name) for name in ("uvloop", "trio", "websockets", "wsproto")},
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
        },
        "quick": opts.quick,
        "profiled": opts.profile,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start = time.perf_counter()
    if "fanout" in only:
        t = time.perf_counter()
        bench_fanout(opts, res)
        log(f"fan-out done in {time.perf_counter() - t:.0f} s")
    if "bomb" in only:
        t = time.perf_counter()
        bench_bomb(opts, res)
        log(f"deflate bomb done in {time.perf_counter() - t:.0f} s")
    res["environment"]["loadavg_at_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - start
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    res["json"] = str(opts.out)
    opts.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
