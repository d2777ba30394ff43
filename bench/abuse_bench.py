#!/usr/bin/env python3
"""One attacker against everyone else (issue 10's "must show"): before and after, both backends.

Each case starts a fresh ``tank serve --backend B --host 127.0.0.1 --port 0`` subprocess (default
options, uvloop for asyncio when installed, log level info) from one of these code trees:

- ``before``: commit ``011bed0`` in a git worktree (``--before-dir``, default ``/tmp/tank-before``;
  created when missing and then removed at the end);
- ``after``: this working tree, with its default ``Limits``;
- ``after-nofps``: this working tree with ``Limits(max_frames_per_second=None)``, so that only the
  per-turn input budget and the byte rate stand between a flooder and the others;
- ``after-nolimit``: also ``max_input_bytes_per_second=None``: the input budget alone (not run
  unless asked for with ``--code``).

The server runs through a small wrapper written to a temporary directory: it puts the tree first on
``sys.path``, prints ``tank_core.__file__`` on stderr (checked against the tree, so the right code
is measured), then runs ``tank_cli._main.main``, the ``tank`` command. The ``after-no*`` variants
pass ``--max-frames-per-second off`` (and ``--max-input-bytes-per-second off``) when that tree's
``tank serve --help`` lists them; otherwise the wrapper replaces ``limits`` in the settings that
``tank_cli._serve.resolve`` returns and says so on stderr (checked too).

The well-behaved client (the *probe*) is a raw-socket WebSocket client in a thread of this process:
it sends a WebSocket Ping with an 8-byte sequence number, waits for the Pong carrying it, waits until
10 ms have passed since the Ping, and sends the next one. Its round trip (p50, p99, max in ms) is the
others' latency. A Pong still missing when the case's window ends is waited for ``--drain`` more
seconds; if it never comes, its time is counted as the time waited and the max is shown as ``>=``.
Every attacker runs in its own process (``multiprocessing``, spawn), and the server's RSS is read
from ``/proc/PID/status`` (``VmRSS``; ``VmHWM`` for the peak) every 20 ms by another thread.

Cases (``--only``, comma-separated; ``flood`` means the five flood cases):

- ``idle``: the probe alone for 3 s (the baseline);
- ``ping``, ``sub``, ``heartbeat``, ``unsub``, ``binary``: one connection floods, for ``--seconds``
  (5 s), with masked frames written as fast as the socket takes them (``send`` on a prebuilt 64 KiB
  buffer): empty Pings; ``sub:x``; ``{"type":"heartbeat"}``; ``unsub:`` of 100 topics nobody holds;
  binary frames of 4 bytes that are not UTF-8. A thread of the flooder reads and parses everything
  the server sends (so it is never a slow consumer), counting Pongs and noting a Close and its code.
  Reported: how many frames the flooder wrote, how many the server handled (Pongs received for
  ``ping``, a lower bound since a server may skip Pongs for a peer with a Pong backlog;
  ``messages_in + messages_dropped`` of ``/api/stats`` for the others, asked for right after the
  window and the probe's last Pong), the Close code the flooder got and when, and the server's
  CPU time in the window;
- ``pipeline``: one socket sends 20,000 pipelined ``GET /tank.js HTTP/1.1`` requests (840,000
  bytes) for at most ``--seconds`` and never reads; at the end of the window it reports how many
  answer bytes wait unread in its receive buffer (``FIONREAD``) and closes. Reported: RSS growth
  (peak minus the baseline) per byte the attacker got into the socket, the probe meanwhile, and the
  RSS 2 s after the attacker left;
- ``partial``: 300 connections upgrade, then each sends a text frame header announcing 1,048,000
  bytes and 1,040,000 bytes of its payload, never the rest (sending stops after 20 s at most),
  then they hold ``--seconds`` more while the server reads what the kernel buffered. Reported:
  RSS growth per attacker byte, what became of the connections (still open, or the Close code they
  got), ``partial_bytes`` and ``limit_hits`` from ``/api/stats`` when the server has them, the
  probe meanwhile, and the RSS 2 s after all 300 left.

Only 127.0.0.1 is contacted; every case is bounded in time and count, and every server is killed
(SIGKILL) at the end of its case. ``--quick`` is a smoke run (2 s windows, 5,000 requests, 60
half-sent messages, the ``after-no*`` variants for ``ping`` only).

Usage: ``.venv/bin/python bench/abuse_bench.py [--quick] [--only CASES] [--backends asyncio,trio]
[--code before,after,after-nofps] [--seconds 5] [--out PATH]``. A table goes to stdout (Markdown),
progress to stderr, and everything to ``bench/results/abuse_bench.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import importlib.metadata
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
BEFORE_COMMIT = "011bed0"
FLOOD_KINDS = ("ping", "sub", "heartbeat", "unsub", "binary")
ALL_CASES = ("idle", *FLOOD_KINDS, "pipeline", "partial")
MASK = b"\x37\xfa\x21\x3d"
PROBE_INTERVAL = 0.010
RSS_PERIOD = 0.020
PIPELINE_REQUEST = b"GET /tank.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PARTIAL_ANNOUNCED = 1_048_000
PARTIAL_SENT = 1_040_000

Json = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- WebSocket bytes


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (masked with ``MASK``)."""
    return _header(opcode, len(payload), fin=fin) + _mask(payload)


def _header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes([first, 0x80 | length])
    elif length < 65_536:
        head = bytes([first, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + length.to_bytes(8, "big")
    return head + MASK


def _mask(payload: bytes) -> bytes:
    key = (MASK * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


def flood_buffer(kind: str) -> tuple[bytes, int]:
    """About 64 KiB of whole frames for ``kind``; (buffer, frames in it)."""
    if kind == "ping":
        frames = [masked_frame(0x9, b"")]
    elif kind == "sub":
        frames = [masked_frame(0x1, b"sub:x")]
    elif kind == "heartbeat":
        frames = [masked_frame(0x1, b'{"type":"heartbeat"}')]
    elif kind == "unsub":
        frames = [masked_frame(0x1, f"unsub:nobody-{i:03d}".encode()) for i in range(100)]
    elif kind == "binary":
        frames = [masked_frame(0x2, b"\xff\xfe\xfd\xfc")]
    else:
        raise ValueError(kind)
    unit = b"".join(frames)
    repeat = max(1, 65_536 // len(unit))
    return unit * repeat, len(frames) * repeat


def upgrade_request(port: int, user: str) -> bytes:
    return (
        f"GET /ws?user_id={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def ws_connect(port: int, user: str, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A blocking socket past a 101 answer, and the bytes that followed the answer's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(upgrade_request(port, user))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65_536)
        if not chunk:
            sock.close()
            raise ConnectionError(f"upgrade answered nothing (got {data[:60]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}")
    return sock, rest


_EMPTY_PONGS = re.compile(rb"(?:\x8a\x00)+")


@dataclass
class FrameReader:
    """Parses the server's (unmasked) frames; counts them, keeps what a client must act on."""

    keep_pongs: bool = False
    buf: bytearray = field(default_factory=bytearray)
    pongs: int = 0
    data_frames: int = 0
    pong_payloads: list[bytes] = field(default_factory=list)
    ping_payloads: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            if not self.keep_pongs and buf[pos] == 0x8A and buf[pos + 1] == 0:
                match = _EMPTY_PONGS.match(buf, pos)
                assert match is not None
                self.pongs += (match.end() - pos) // 2
                pos = match.end()
                continue
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if buf[pos + 1] & 0x80:
                head += 4  # a server never masks; tolerate it anyway (payload left masked)
            if end - pos < head + length:
                break
            self._frame(buf[pos] & 0x0F, bytes(buf[pos + head : pos + head + length]))
            pos += head + length
        del buf[:pos]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0xA:
            self.pongs += 1
            if self.keep_pongs:
                self.pong_payloads.append(payload)
        elif opcode == 0x9:
            self.ping_payloads.append(payload)
        elif opcode == 0x8:
            if self.close_code is None:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self.data_frames += 1


# ---------------------------------------------------------------------- measurements


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


class Probe(threading.Thread):
    """The well-behaved client: WebSocket Ping, wait for its Pong, again every 10 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock, rest = ws_connect(port, "probe")
        self.sock.settimeout(0.05)
        self.reader = FrameReader(keep_pongs=True)
        self.reader.feed(rest)
        self.rtts: list[float] = []
        self.sent_at: list[float] = []
        self.censored = 0
        self.error: str | None = None
        self._no_more_pings = threading.Event()
        self._hard_deadline = math.inf
        self._t_begin = 0.0

    def begin(self) -> None:
        self._t_begin = time.perf_counter()
        self.start()

    def finish(self, drain: float) -> None:
        """Send no more Pings; wait at most ``drain`` s for the Pong outstanding."""
        self._hard_deadline = time.perf_counter() + drain
        self._no_more_pings.set()
        self.join(drain + 5)
        with contextlib.suppress(OSError):
            self.sock.close()

    def run(self) -> None:
        seq = 0
        try:
            while not self._no_more_pings.is_set():
                seq += 1
                token = seq.to_bytes(8, "big")
                sent = time.perf_counter()
                self.sock.sendall(masked_frame(0x9, token))
                if not self._wait_for(token):
                    self.rtts.append(time.perf_counter() - sent)
                    self.sent_at.append(sent - self._t_begin)
                    self.censored += 1
                    return
                self.rtts.append(time.perf_counter() - sent)
                self.sent_at.append(sent - self._t_begin)
                pause = sent + PROBE_INTERVAL - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _wait_for(self, token: bytes) -> bool:
        reader = self.reader
        while True:
            while reader.ping_payloads:  # answer the server's heartbeat Pings
                self.sock.sendall(masked_frame(0xA, reader.ping_payloads.pop(0)))
            if token in reader.pong_payloads:
                reader.pong_payloads.clear()
                return True
            if reader.close_code is not None:
                raise ConnectionError(f"probe closed by the server: {reader.close_code}")
            if time.perf_counter() > self._hard_deadline:
                return False
            try:
                data = self.sock.recv(65_536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("probe: the server closed the socket")
            reader.feed(data)

    def summary(self) -> Json:
        out: Json = {"n": len(self.rtts), "censored": self.censored, "error": self.error}
        if self.rtts:
            ms = [r * 1000 for r in self.rtts]
            out.update(p50_ms=percentile(ms, 0.50), p99_ms=percentile(ms, 0.99), max_ms=max(ms))
            # (seconds from the window's start when the Ping went, round trip ms), every sample
            out["samples"] = [(round(t, 4), round(r, 3)) for t, r in zip(self.sent_at, ms, strict=True)]
        return out


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """The server's VmRSS every 20 ms, as (seconds since start, bytes)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError):
                rss = proc_status(self.pid)["VmRSS"]
                self.samples.append((time.perf_counter() - self.t0, rss))
            time.sleep(RSS_PERIOD)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in list(self.samples) if start <= t <= end]

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def get_stats(port: int, timeout: float = 10.0) -> tuple[Json | None, float]:
    """``GET /api/stats`` on a fresh connection: (the JSON or None, seconds it took)."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(
                f"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                .encode()
            )
            data = b""
            while True:
                chunk = sock.recv(1_048_576)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n", 1)[0]:
            return None, time.perf_counter() - started
        parsed: Json = json.loads(body)
        return parsed, time.perf_counter() - started
    except (OSError, ValueError):
        return None, time.perf_counter() - started


# ---------------------------------------------------------------------- servers

WRAPPER = '''\
"""abuse_bench's server wrapper: the tank command from ABUSE_BENCH_CODE_DIR, limits overridden."""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.environ["ABUSE_BENCH_CODE_DIR"])
import tank_core

sys.stderr.write(f"abuse_bench: tank_core from {tank_core.__file__}\\n")
sys.stderr.flush()
overrides = json.loads(os.environ.get("ABUSE_BENCH_LIMITS") or "{}")
if overrides:
    import tank_cli._serve as serve_module

    original = serve_module.resolve

    def resolve(args, environ):
        settings = original(args, environ)
        limits = dataclasses.replace(settings.config.limits, **overrides)
        config = dataclasses.replace(settings.config, limits=limits)
        sys.stderr.write(f"abuse_bench: limits overridden: {limits}\\n")
        sys.stderr.flush()
        return dataclasses.replace(settings, config=config)

    serve_module.resolve = resolve
from tank_cli._main import main

raise SystemExit(main(sys.argv[1:]))
'''


@dataclass(frozen=True)
class Code:
    name: str
    directory: Path
    limits: dict[str, Any]


_HELP: dict[Path, str] = {}


def limit_flags(code: Code) -> list[str] | None:
    """``code.limits`` as ``tank serve`` options (``None`` = "off") when that tree's CLI has them
    all, else None (then the wrapper overrides them in the settings)."""
    if code.directory not in _HELP:
        _HELP[code.directory] = subprocess.run(
            [PYTHON, "-m", "tank_cli", "serve", "--help"], cwd=code.directory, capture_output=True,
            text=True, check=False, timeout=30,
        ).stdout
    flags: list[str] = []
    for name, value in code.limits.items():
        flag = "--" + name.replace("_", "-")
        if flag + " " not in _HELP[code.directory]:
            return None
        flags += [flag, "off" if value is None else str(value)]
    return flags


class Server:
    """``tank serve`` from one code tree, on a free port of 127.0.0.1; killed by ``stop``."""

    def __init__(self, code: Code, backend: str, workdir: Path) -> None:
        self.code = code
        flags = limit_flags(code)
        self.limits_by = "none" if not code.limits else "cli" if flags is not None else "wrapper"
        self.out_path = workdir / f"server-{os.getpid()}-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["ABUSE_BENCH_CODE_DIR"] = str(code.directory)
        env["ABUSE_BENCH_LIMITS"] = json.dumps(code.limits if self.limits_by == "wrapper" else {})
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [PYTHON, str(workdir / "serve_wrapper.py"), "serve", "--backend", backend,
                 "--host", "127.0.0.1", "--port", "0", *(flags or [])],
                cwd=code.directory, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )
        self.pid = self.proc.pid
        self.port = self._wait_ready()
        self.tank_core_file = self._check_tree()

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = re.search(rb"tank: serving ws://127\.0\.0\.1:(\d+)/", self.out_path.read_bytes())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = self.stderr_tail()
        self.stop()
        raise RuntimeError(f"server did not start: {tail}")

    def _check_tree(self) -> str:
        match = re.search(rb"abuse_bench: tank_core from (.*)\n", self.err_path.read_bytes())
        found = match.group(1).decode() if match else "?"
        if not Path(found).resolve().is_relative_to(self.code.directory.resolve()):
            self.stop()
            raise RuntimeError(f"{self.code.name}: tank_core imported from {found}")
        if self.limits_by == "wrapper" and b"abuse_bench: limits overridden" not in \
                self.err_path.read_bytes():
            self.stop()
            raise RuntimeError(f"{self.code.name}: the wrapper could not override the limits")
        return found

    def stderr_tail(self, limit: int = 600) -> str:
        try:
            return self.err_path.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return "?"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for path in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                path.unlink()


# ---------------------------------------------------------------------- attackers (own processes)


def flood_worker(pipe: multiprocessing.connection.Connection, port: int, kind: str,
                 seconds: float) -> None:
    """Floods ``kind`` frames for ``seconds`` once told "go"; reports on "quit"."""
    result: Json = {}
    try:
        sock, rest = ws_connect(port, "flooder")
    except OSError as exc:
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    reader = FrameReader()
    reader.feed(rest)
    closed_at: list[float] = []
    eof = threading.Event()
    started = 0.0

    def read_all() -> None:
        while True:
            try:
                data = sock.recv(1_048_576)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            had_close = reader.close_code is not None
            reader.feed(data)
            if not had_close and reader.close_code is not None:
                closed_at.append(time.perf_counter() - started)
        eof.set()

    buffer, frames_in_buffer = flood_buffer(kind)
    view = memoryview(buffer)
    pipe.send({"ready": True})
    pipe.recv()  # "go"
    started = time.perf_counter()
    sock.settimeout(0.1)
    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    sent = 0
    offset = 0
    send_error = None
    deadline = started + seconds
    while time.perf_counter() < deadline and reader.close_code is None and not eof.is_set():
        try:
            n = sock.send(view[offset:])
        except TimeoutError:
            continue
        except OSError as exc:
            send_error = f"{type(exc).__name__}: {exc}"
            break
        sent += n
        offset = (offset + n) % len(buffer)
    stopped = time.perf_counter() - started
    result.update(
        bytes_sent=sent,
        frames_sent=sent * frames_in_buffer // len(buffer),
        writing_s=stopped,
        send_error=send_error,
    )
    pipe.send({"stopped": True})
    pipe.recv()  # "quit"
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    eof.wait(1.0)
    sock.close()
    thread.join(2)
    result.update(
        pongs=reader.pongs,
        data_frames=reader.data_frames,
        close_code=reader.close_code,
        close_reason=reader.close_reason,
        closed_at_s=closed_at[0] if closed_at else None,
        eof_seen=eof.is_set(),
    )
    pipe.send(result)


def pipeline_worker(pipe: multiprocessing.connection.Connection, port: int, requests: int,
                    seconds: float) -> None:
    """Sends ``requests`` pipelined GETs within ``seconds`` and never reads; reports on "leave"."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    payload = PIPELINE_REQUEST * requests
    view = memoryview(payload)
    pipe.send({"ready": True})
    pipe.recv()  # "go"
    started = time.perf_counter()
    sock.settimeout(0.1)
    sent = 0
    send_error = None
    deadline = started + seconds
    while sent < len(payload) and time.perf_counter() < deadline:
        try:
            sent += sock.send(view[sent:])
        except TimeoutError:
            continue
        except OSError as exc:
            send_error = f"{type(exc).__name__}: {exc}"
            break
    sending_s = time.perf_counter() - started
    pipe.send({"sent": sent})
    pipe.recv()  # "leave"
    unread = array.array("i", [0])
    with contextlib.suppress(OSError):
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread, True)
    sock.close()  # unread answers in the buffer: the kernel resets the connection
    pipe.send({
        "bytes_sent": sent,
        "requests_sent": sent // len(PIPELINE_REQUEST),
        "all_sent": sent == len(payload),
        "sending_s": sending_s,
        "send_error": send_error,
        "unread_answer_bytes": unread[0],
    })


@dataclass
class _Half:
    sock: socket.socket
    reader: FrameReader
    sent: int = 0
    state: str = "sending"  # sending, holding, closed <code>, eof, reset


def partial_worker(pipe: multiprocessing.connection.Connection, port: int, count: int,
                   seconds: float) -> None:
    """``count`` connections each send most of a 1,048,000-byte text message, then hold."""
    head = _header(0x1, PARTIAL_ANNOUNCED)
    body = _mask(b"a" * 1024) * (PARTIAL_SENT // 1024 + 1)
    message = memoryview(head + body[:PARTIAL_SENT])
    conns: list[_Half] = []
    refused: Counter[str] = Counter()
    for i in range(count):
        try:
            sock, rest = ws_connect(port, f"half-{i}", timeout=5)
        except OSError as exc:
            refused[f"{type(exc).__name__}: {exc}"[:80]] += 1
            continue
        sock.setblocking(False)
        reader = FrameReader()
        reader.feed(rest)
        conns.append(_Half(sock, reader))
    pipe.send({"ready": len(conns), "refused": dict(refused)})
    pipe.recv()  # "go"
    selector = selectors.DefaultSelector()
    for half in conns:
        selector.register(half.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, half)
    started = time.perf_counter()
    deadline = started + seconds
    sending_done: float | None = None

    def end(half: _Half, state: str) -> None:
        if half.reader.close_code is not None:
            state = f"closed {half.reader.close_code}"
        half.state = state
        selector.unregister(half.sock)

    def pump(timeout: float) -> None:
        for key, events in selector.select(timeout):
            half: _Half = key.data
            if events & selectors.EVENT_READ:
                try:
                    data = half.sock.recv(65_536)
                except BlockingIOError:
                    data = None
                except OSError:
                    end(half, "reset")
                    continue
                if data == b"":
                    end(half, "eof")
                    continue
                if data:
                    half.reader.feed(data)
            if events & selectors.EVENT_WRITE and half.state == "sending":
                try:
                    half.sent += half.sock.send(message[half.sent : half.sent + 262_144])
                except BlockingIOError:
                    pass
                except OSError:
                    end(half, "reset")
                    continue
                if half.sent == len(message):
                    half.state = "holding"
                    selector.modify(half.sock, selectors.EVENT_READ, half)

    while time.perf_counter() < deadline and any(h.state == "sending" for h in conns):
        pump(0.05)
    sending_done = time.perf_counter() - started
    pipe.send({"sent": sum(h.sent for h in conns), "sending_s": sending_done})
    while not pipe.poll():  # hold, and notice the closes, until "leave"
        pump(0.02)
    pipe.recv()
    outcomes: Counter[str] = Counter()
    for half in conns:
        state = half.state
        if half.reader.close_code is not None:
            state = f"closed {half.reader.close_code}"
        elif state == "sending":
            state = "still sending (paused)"
        outcomes[state] += 1
        half.sock.close()
    pipe.send({
        "connections": len(conns),
        "refused": dict(refused),
        "bytes_sent": sum(h.sent for h in conns),
        "sending_s": sending_done,
        "outcomes": dict(outcomes),
        "complete_sends": sum(1 for h in conns if h.sent == len(message)),
    })


def spawn(target: Any, *args: Any) -> tuple[Any, multiprocessing.connection.Connection]:
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=target, args=(theirs, *args), daemon=True)
    process.start()
    theirs.close()
    return process, mine


def receive(pipe: multiprocessing.connection.Connection, timeout: float) -> Json:
    if not pipe.poll(timeout):
        raise TimeoutError("the attacker process did not answer")
    answer: Json = pipe.recv()
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer


def reap(process: Any) -> None:
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


# ---------------------------------------------------------------------- cases


@dataclass
class Settings:
    seconds: float
    idle_seconds: float
    drain: float
    requests: int
    half_sent: int
    partial_seconds: float


@contextlib.contextmanager
def running(code: Code, backend: str, workdir: Path) -> Iterator[Server]:
    server = Server(code, backend, workdir)
    try:
        yield server
    finally:
        server.stop()


def flood_case(kind: str, server: Server, settings: Settings) -> Json:
    probe = Probe(server.port)
    process = pipe = None
    seconds = settings.idle_seconds if kind == "idle" else settings.seconds
    cpu0 = cpu_seconds(server.pid)
    rss0 = proc_status(server.pid)["VmRSS"]
    try:
        if kind != "idle":
            process, pipe = spawn(flood_worker, server.port, kind, seconds)
            receive(pipe, 15)
        cpu0 = cpu_seconds(server.pid)
        probe.begin()
        if pipe is not None:
            pipe.send("go")
        time.sleep(seconds)
        cpu1 = cpu_seconds(server.pid)
        probe.finish(settings.drain)
        stats, stats_s = get_stats(server.port)
        out: Json = {"probe": probe.summary(), "server_cpu_s": cpu1 - cpu0,
                     "rss_growth": proc_status(server.pid)["VmRSS"] - rss0,
                     "stats_answer_s": stats_s}
        if stats is not None:
            out["stats"] = {k: stats.get(k) for k in
                            ("messages_in", "messages_dropped", "pongs_received", "limit_hits")}
        if pipe is not None:
            receive(pipe, 30)  # "stopped"
            pipe.send("quit")
            flooder = receive(pipe, 30)
            out["flooder"] = flooder
            if kind == "ping":
                out["handled"] = flooder["pongs"]
            elif stats is not None:
                out["handled"] = stats.get("messages_in", 0) + stats.get("messages_dropped", 0)
        return out
    finally:
        if process is not None:
            reap(process)
        with contextlib.suppress(OSError):
            probe.sock.close()


def _rss_report(sampler: RssSampler, server: Server, base: int, attack: tuple[float, float]) -> Json:
    during = sampler.between(*attack)
    hwm = proc_status(server.pid)["VmHWM"]
    peak = max([*during, base])
    return {"rss_base": base, "rss_peak": peak, "vm_hwm": hwm, "rss_growth": peak - base}


def pipeline_case(server: Server, settings: Settings) -> Json:
    sampler = RssSampler(server.pid)
    probe = Probe(server.port)
    process, pipe = spawn(pipeline_worker, server.port, settings.requests, settings.seconds)
    try:
        receive(pipe, 15)
        time.sleep(0.5)
        base = int(percentile([float(r) for r in sampler.between(0, sampler.now())], 0.5))
        t_go = sampler.now()
        probe.begin()
        pipe.send("go")
        sent = receive(pipe, settings.seconds + 10)["sent"]
        time.sleep(max(0.0, t_go + settings.seconds - sampler.now()))
        probe.finish(settings.drain)
        out = _rss_report(sampler, server, base, (t_go, sampler.now()))
        out["probe"] = probe.summary()
        out["stats_during"], _ = get_stats(server.port)
        pipe.send("leave")
        attacker = receive(pipe, 30)
        attacker["bytes_at_window"] = sent
        out["attacker"] = attacker
        t_left = sampler.now()
        time.sleep(2.0)
        out["rss_after_leave"] = proc_status(server.pid)["VmRSS"]
        out["rss_after_trace"] = [(round(t - t_left, 3), r) for t, r in
                                  sampler.samples if t >= t_left]
        out["growth_per_byte"] = out["rss_growth"] / max(1, attacker["bytes_sent"])
        return out
    finally:
        reap(process)
        sampler.stop()
        with contextlib.suppress(OSError):
            probe.sock.close()


def partial_case(server: Server, settings: Settings) -> Json:
    sampler = RssSampler(server.pid)
    probe = Probe(server.port)
    process, pipe = spawn(partial_worker, server.port, settings.half_sent, settings.partial_seconds)
    try:
        ready = receive(pipe, 60)
        time.sleep(0.5)
        base = int(percentile([float(r) for r in sampler.between(0, sampler.now())], 0.5))
        t_go = sampler.now()
        probe.begin()
        pipe.send("go")
        sending = receive(pipe, settings.partial_seconds + 15)
        time.sleep(settings.seconds)  # holding: the server reads what is buffered, closes arrive
        probe.finish(settings.drain)
        out = _rss_report(sampler, server, base, (t_go, sampler.now()))
        out["probe"] = probe.summary()
        out["handshakes"] = ready
        out["sending"] = sending
        stats, _ = get_stats(server.port)
        if stats is not None:
            out["stats_holding"] = {k: stats.get(k) for k in
                                    ("connections", "partial_bytes", "limit_hits")}
        pipe.send("leave")
        attacker = receive(pipe, 30)
        out["attacker"] = attacker
        t_left = sampler.now()
        time.sleep(2.0)
        out["rss_after_leave"] = proc_status(server.pid)["VmRSS"]
        out["rss_after_trace"] = [(round(t - t_left, 3), r) for t, r in
                                  sampler.samples if t >= t_left]
        out["growth_per_byte"] = out["rss_growth"] / max(1, attacker["bytes_sent"])
        return out
    finally:
        reap(process)
        sampler.stop()
        with contextlib.suppress(OSError):
            probe.sock.close()


def run_case(case: str, code: Code, backend: str, workdir: Path, settings: Settings) -> Json:
    started = time.perf_counter()
    record: Json = {"case": case, "code": code.name, "backend": backend,
                    "loadavg_1min_at_start": os.getloadavg()[0]}
    try:
        with running(code, backend, workdir) as server:
            record["tank_core_file"] = server.tank_core_file
            record["limits_set_by"] = server.limits_by
            if case == "pipeline":
                record.update(pipeline_case(server, settings))
            elif case == "partial":
                record.update(partial_case(server, settings))
            else:
                record.update(flood_case(case, server, settings))
            if server.proc.poll() is not None:
                record["server_died"] = server.stderr_tail()
    except Exception as exc:  # one failed case must not stop the others
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["case_s"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _mb(value: float) -> str:
    return f"{value / 1_048_576:.1f}"


def _probe_cell(probe: Json | None) -> str:
    if not probe or not probe.get("n"):
        return "-"
    limit = ">=" if probe.get("censored") else ""
    return f"{_ms(probe['p50_ms'])} / {_ms(probe['p99_ms'])} / {limit}{_ms(probe['max_ms'])}"


def _closed_cell(flooder: Json | None) -> str:
    if not flooder:
        return "-"
    if flooder.get("close_code") is not None:
        return f"{flooder['close_code']} at {flooder['closed_at_s']:.2f} s"
    if flooder.get("send_error"):
        return "send failed"
    return "no"


def table(results: list[Json]) -> str:
    lines = [
        "Flood: the probe's WebSocket Ping round trip, p50 / p99 / max ms (n samples); the flooder",
        "",
        "| case | backend | code | probe p50 / p99 / max ms | n | flooder wrote (frames) | "
        "server handled | flooder closed | server CPU s in window |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["case"] in ("pipeline", "partial"):
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['backend']} | {r['code']} | error: {r['error']} "
                         "| | | | | |")
            continue
        flooder = r.get("flooder")
        wrote = f"{flooder['frames_sent']:,}" if flooder else "-"
        handled = f"{r['handled']:,}" if "handled" in r else "-"
        if flooder:
            handled += f" (stats in {r['stats_answer_s']:.1f} s)"
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['code']} | {_probe_cell(r.get('probe'))} | "
            f"{r['probe'].get('n', 0)} | {wrote} | {handled} | {_closed_cell(flooder)} | "
            f"{r['server_cpu_s']:.2f} |"
        )
    lines += [
        "",
        "Memory: RSS growth (peak - baseline) per attacker byte, and after the attacker left",
        "",
        "| case | backend | code | attacker bytes | peak growth MiB | growth / byte | "
        "RSS after leaving, vs base MiB | probe p50 / p99 / max ms | attacker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["case"] not in ("pipeline", "partial"):
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['backend']} | {r['code']} | error: {r['error']} "
                         "| | | | | |")
            continue
        attacker = r["attacker"]
        if r["case"] == "pipeline":
            what = (f"{attacker['requests_sent']:,} requests in {attacker['sending_s']:.2f} s; "
                    f"{attacker['unread_answer_bytes']:,} B unread")
        else:
            outcomes = ", ".join(f"{n} {state}" for state, n in sorted(attacker["outcomes"].items()))
            what = f"{outcomes}; sent in {attacker['sending_s']:.2f} s"
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['code']} | {attacker['bytes_sent']:,} | "
            f"{_mb(r['rss_growth'])} | {r['growth_per_byte']:.2f} | "
            f"{_mb(r['rss_after_leave'] - r['rss_base'])} | {_probe_cell(r.get('probe'))} | "
            f"{what} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short and small")
    parser.add_argument("--only", default="all", help=f"cases: {','.join(ALL_CASES)}, flood, all")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--code", default="before,after,after-nofps",
                        help="before, after, after-nofps, after-nolimit")
    parser.add_argument("--seconds", type=float, default=None, help="window per case (5; quick 2)")
    parser.add_argument("--drain", type=float, default=5.0,
                        help="seconds to wait for the probe's last Pong after a window")
    parser.add_argument("--before-commit", default=BEFORE_COMMIT,
                        help="the commit 'before' runs (default %(default)s)")
    parser.add_argument("--before-dir", default="/tmp/tank-before")
    parser.add_argument("--keep-worktree", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "abuse_bench.json"))
    args = parser.parse_args()

    cases: list[str] = []
    for name in args.only.split(","):
        chosen = {"all": ALL_CASES, "flood": FLOOD_KINDS}.get(name, (name,))
        for case in chosen:
            if case not in ALL_CASES:
                parser.error(f"unknown case {case!r}")
            if case not in cases:
                cases.append(case)
    cases.sort(key=ALL_CASES.index)
    backends = args.backends.split(",")
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    settings = Settings(
        seconds=seconds,
        idle_seconds=min(seconds, 3.0),
        drain=args.drain,
        requests=5_000 if args.quick else 20_000,
        half_sent=60 if args.quick else 300,
        partial_seconds=10.0 if args.quick else 20.0,
    )
    before_dir = Path(args.before_dir)
    codes = {
        "before": Code("before", before_dir, {}),
        "after": Code("after", ROOT, {}),
        "after-nofps": Code("after-nofps", ROOT, {"max_frames_per_second": None}),
        "after-nolimit": Code("after-nolimit", ROOT, {"max_frames_per_second": None,
                                                      "max_input_bytes_per_second": None}),
    }
    chosen_codes = [codes[name] for name in args.code.split(",")]

    created_worktree = False
    if any(code.name == "before" for code in chosen_codes) and not before_dir.exists():
        log(f"creating the worktree {before_dir} at {args.before_commit}")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_dir),
                        args.before_commit], check=True, capture_output=True)
        created_worktree = True

    env: Json = {
        "commit": git("rev-parse", "--short", "HEAD")
        + ("+dirty" if git("status", "--porcelain", "--", "tank_core", "tank_asyncio",
                           "tank_trio", "tank_cli") else ""),
        "before_commit": subprocess.run(["git", "-C", str(before_dir), "rev-parse", "--short",
                                         "HEAD"], capture_output=True, text=True,
                                        check=False).stdout.strip() or args.before_commit,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "quick": args.quick,
        "settings": settings.__dict__,
        "probe_interval_s": PROBE_INTERVAL,
    }
    try:
        env["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        env["uvloop"] = None

    results: list[Json] = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="abuse_bench-") as tmp:
            workdir = Path(tmp)
            (workdir / "serve_wrapper.py").write_text(WRAPPER)
            for case in cases:
                for backend in backends:
                    for code in chosen_codes:
                        if case in ("pipeline", "partial") and code.name.startswith("after-no"):
                            continue  # the frame and byte rates play no part there
                        if args.quick and code.name.startswith("after-no") and case != "ping":
                            continue
                        record = run_case(case, code, backend, workdir, settings)
                        results.append(record)
                        summary = record.get("error") or _probe_cell(record.get("probe"))
                        log(f"{case:9} {backend:7} {code.name:13} {record['case_s']:5.1f} s  "
                            f"{summary}")
    finally:
        if created_worktree and not args.keep_worktree:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before_dir)], check=False, capture_output=True)
    env["loadavg_at_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - started

    report = table(results)
    print(report)
    print(f"\nload average at start {env['loadavg_at_start']}, at end {env['loadavg_at_end']}; "
          f"{env['total_s']:.0f} s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": results}, indent=1) + "\n")
    log(f"wrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
