"""A Tank server on the standard library's ``selectors``: a complete custom transport in one file.

Run ``python examples/selectors_server.py --port 0`` (``--help`` for the options). The core serves
the protocol and the HTTP API; this file moves bytes and time (docs/custom-transports.md):

- one ``select()`` loop over non-blocking sockets; its timeout is the one timer (``next_deadline``);
- output is pulled (``take_ready``, ``data_to_send``) when a socket can be written; the rest of a
  partial write waits here under ``EVENT_WRITE`` and nothing more is pulled meanwhile, so unsent
  bytes stay counted in the core, which is how it spots slow consumers;
- hooks, verdicts, the poison rule and ``publish`` & co. come from ``tank_core.ServerSession``;
- ``call_soon`` (a socketpair wakes the loop) is the way in from other threads and signal handlers.

``--redis-url`` makes the process a cluster node (docs/scale-out.md; needs hiredis): the core asks
for its Redis connections with ``OpenConnection``. Limits: no event loop, so a coroutine hook or
verdict must finish without awaiting I/O (one that suspends is cancelled and logged); host names
resolve with a blocking ``getaddrinfo``; no TLS to Redis; ``publish`` and the other commands run
on the loop's thread: ``server.call_soon(lambda: server.publish(...))`` from elsewhere.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import inspect
import logging
import math
import selectors
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from tank_core import BrokerConfig, ConfigError, ServerConfig, ServerSession
from tank_core.actions import AbortTransport, OpenConnection, PauseReading, ResumeReading
from tank_core.events import BytesReceived, ConnectionOpened, TransportClosed
from tank_core.server.session import EARLY_WAKE_SLACK

logger = logging.getLogger("tank")

READ_SIZE = 65536
WRITE_CHUNK = 65536  # pulled per write: what the kernel has not taken stays counted in the core
BACKLOG = 1024  # reconnect storms (tank-websocket.js retries every second) arrive at once
_LISTENER, _WAKE = "listener", "wake"


@dataclass(eq=False, slots=True)
class _Socket:
    conn_id: int
    sock: socket.socket
    connecting: bool = False  # an OpenConnection in progress
    pending: bytes = b""  # taken from the core, not yet accepted by the kernel
    reading: bool = True  # False between PauseReading and ResumeReading
    lingering: bool = False  # FIN sent after our last bytes; reading on until the peer's FIN
    mask: int = 0  # the events registered with the selector


class SelectorsServer(ServerSession):
    """``serve_forever()`` on one thread; ``call_soon`` and ``shutdown`` from any thread or a signal
    handler. ``options`` are ``ServerSession``'s: hooks, ``redis_url``."""

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1",
                 port: int = 8080, **options: Any) -> None:
        super().__init__(config, **options)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self._listener.setblocking(False)
        self.host, self.port = host, int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        # deque.append and popleft are atomic: safe from threads and signal handlers, no lock.
        self._soon: collections.deque[Callable[[], object]] = collections.deque()
        self._turn_due = False  # the core asked for _end_turn after the next select()
        self._socks: dict[int, _Socket] = {}
        self._deadline: float | None = None  # the one timer
        self._stop_by: float | None = None  # set when shutdown begins
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.config.path}"

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the loop's thread at its next turn."""
        self._soon.append(fn)
        with contextlib.suppress(OSError):  # a full wake-up buffer wakes the loop anyway
            self._wake_w.send(b"\0")

    def shutdown(self) -> None:
        """Begin a graceful shutdown and return; ``serve_forever`` returns once it is over."""
        self.call_soon(self._begin_stop)

    def serve_forever(self) -> None:
        """Serve until a shutdown completes; re-raise a failure of the core (the poison rule)."""
        self._start_core()  # a cluster node asks for its Redis connections here
        try:
            while not self._stopped:
                self._run_once()
                if self._stop_by is not None and (not self._socks or self._clock() >= self._stop_by):
                    break  # every connection (and Redis link) is gone, or the grace is over
        finally:
            self._close_all()  # aborts the stragglers
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
        if self.failure is not None:
            raise self.failure

    # ------------------------------------------------------------------ one turn of the loop

    def _run_once(self) -> None:
        turn_due = self._turn_due  # asked for during an earlier turn: ended after this select()
        now = self._clock()
        timeout = math.inf if self._deadline is None else self._deadline - now
        if self._stop_by is not None:
            timeout = min(timeout, self._stop_by - now)
        if self._soon or self._turn_due:
            timeout = 0.0
        for key, mask in self._selector.select(None if timeout == math.inf else max(0.0, timeout)):
            conn = key.data
            if self._stopped:
                return  # the core failed on an earlier event: every socket is closed
            if conn is _LISTENER:
                self._accept_some()
            elif conn is _WAKE:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            elif conn.conn_id in self._socks:  # not closed earlier in this turn
                if mask & selectors.EVENT_WRITE:
                    self._writable(conn)
                if mask & selectors.EVENT_READ and conn.conn_id in self._socks:
                    self._readable(conn)
        for _ in range(len(self._soon)):  # what was queued before this turn; later ones wait
            fn = self._soon.popleft()
            try:
                fn()
            except Exception:
                logger.exception("call_soon(%r) raised", fn)
        # select() may return a hair early; the session ticks at the armed deadline then.
        if self._deadline is not None and self._clock() >= self._deadline - EARLY_WAKE_SLACK:
            self._deadline = None  # the session re-arms (_arm) if anything is left
            self._timer_fired()
        if turn_due:  # the sockets that yielded last turn go on, after the others had this one
            self._turn_due = False
            self._end_turn()
        self._flush()
        if self._core.turn_wanted:  # taking an HTTP answer lets its next requests go on
            self._turn_wanted()

    def _accept_some(self) -> None:
        for _ in range(100):  # a bounded batch: established connections get their turn too
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if not isinstance(exc, BlockingIOError | InterruptedError):
                    logger.warning("accept failed: %s", exc)  # EMFILE...: serve the others
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames, no delay
            conn_id = self._accept(str(address[0]))
            if conn_id is None:  # the server failed
                sock.close()
                return
            self._socks[conn_id] = conn = _Socket(conn_id, sock)
            self._watch(conn)

    def _readable(self, conn: _Socket) -> None:
        if not conn.reading:
            return
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(conn, str(exc) or type(exc).__name__)
            return
        if not data:  # EOF is TransportClosed, never empty bytes
            self._gone(conn, None)
            return
        self._event(BytesReceived(conn_id=conn.conn_id, data=data, now=self._clock(),
                                  wall_time=self._wall()))

    def _writable(self, conn: _Socket) -> None:
        if conn.connecting:
            error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._gone(conn, errno.errorcode.get(error, str(error)))
                return
            conn.connecting = False
            self._watch(conn)
            self._event(ConnectionOpened(conn_id=conn.conn_id, now=self._clock(),
                                         wall_time=self._wall()))
        if conn.conn_id in self._socks:  # (the core may have given up on it meanwhile)
            self._pump(conn)  # also what was queued while it was connecting

    def _flush(self) -> None:
        """The sockets named this turn: one write each for everything queued meanwhile."""
        for conn_id in self._core.take_ready():
            conn = self._socks.get(conn_id)
            if conn is not None and not conn.pending and not conn.connecting:
                self._pump(conn)  # with bytes pending, EVENT_WRITE pulls the rest later

    def _pump(self, conn: _Socket) -> None:
        """Write until the kernel refuses or the core has nothing more; None from the core: close."""
        while True:
            if not conn.pending:
                try:
                    data = self._core.data_to_send(conn.conn_id, WRITE_CHUNK)
                except Exception as exc:  # a bug of ours in the core: stop serving
                    self._fail(exc)
                    return
                if data is None:
                    self._linger(conn)
                    return
                if not data:
                    break
                conn.pending = data
            try:
                sent = conn.sock.send(conn.pending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._gone(conn, str(exc) or type(exc).__name__, write_failed=True)
                return
            conn.pending = conn.pending[sent:]
            if conn.pending:
                break  # the kernel's buffer is full: wait for EVENT_WRITE
        self._watch(conn)

    def _linger(self, conn: _Socket) -> None:
        """The core is done with it: FIN after our last bytes, then read on (the core ignores
        it) until the peer's FIN, so unread input cannot turn our close into a TCP reset. The
        core aborts it after close_timeout if the peer never closes."""
        if conn.lingering:
            return
        conn.lingering, conn.reading = True, True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._gone(conn, str(exc) or type(exc).__name__)
            return
        self._watch(conn)

    def _watch(self, conn: _Socket) -> None:
        """Register with the selector exactly the events this socket waits for now."""
        mask = selectors.EVENT_WRITE if conn.connecting or conn.pending else 0
        if conn.reading and not conn.connecting:
            mask |= selectors.EVENT_READ
        if mask != conn.mask:
            if conn.mask == 0:
                self._selector.register(conn.sock, mask, conn)
            elif mask == 0:
                self._selector.unregister(conn.sock)
            else:
                self._selector.modify(conn.sock, mask, conn)
            conn.mask = mask

    def _gone(self, conn: _Socket, error: str | None, *, write_failed: bool = False) -> None:
        """EOF, an error, or the close the core asked for: close, and tell the core (it wants to
        hear it even after asking: otherwise it aborts the socket after close_timeout)."""
        self._drop(conn)
        self._event(TransportClosed(conn_id=conn.conn_id, now=self._clock(), wall_time=self._wall(),
                                    error=error, write_failed=write_failed))

    def _drop(self, conn: _Socket) -> None:
        """Close now; what the kernel holds still goes out (as asyncio's and trio's aborts do)."""
        self._socks.pop(conn.conn_id, None)
        if conn.mask:
            self._selector.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._socks.values()):
            self._drop(conn)
        if self._listener.fileno() != -1:
            self._selector.unregister(self._listener)
            self._listener.close()

    def _begin_stop(self) -> None:
        if self._stop_by is None and not self._stopped:
            self._selector.unregister(self._listener)  # stop accepting first
            self._listener.close()
            self._stop_by = self._clock() + self._shutdown_grace  # close_timeout + 0.5 s
            self._begin_shutdown()  # "Server is shutting down", Close 1001, HTTP dropped, Redis left

    def _open(self, conn_id: int, host: str, port: int, tls: bool) -> None:
        """Start a non-blocking connect; the socket turns writable once it is done (or failed)."""
        if tls:
            return self._open_failed(conn_id, "TLS (rediss://) is not supported by this example")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            return self._open_failed(conn_id, str(exc))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = sock.connect_ex(address)
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return self._open_failed(conn_id, errno.errorcode.get(result, str(result)))
        self._socks[conn_id] = conn = _Socket(conn_id, sock, connecting=True)
        self._watch(conn)

    def _open_failed(self, conn_id: int, error: str) -> None:
        # Told on the next turn: we are inside the batch of actions that asked for it.
        self.call_soon(lambda: self._event(TransportClosed(
            conn_id=conn_id, now=self._clock(), wall_time=self._wall(), error=error)))

    # ------------------------------------------------------------------ what ServerSession needs

    def _clock(self) -> float:
        return time.monotonic()

    def _wall(self) -> float:
        return time.time()

    def _execute(self, action: OpenConnection | AbortTransport | PauseReading | ResumeReading) -> None:
        if isinstance(action, OpenConnection):
            self._open(action.conn_id, action.host, action.port, action.tls)
        elif (conn := self._socks.get(action.conn_id)) is None:
            pass  # already gone
        elif isinstance(action, AbortTransport):
            self._drop(conn)  # the core has forgotten it: no TransportClosed
        else:
            conn.reading = conn.lingering or isinstance(action, ResumeReading)
            self._watch(conn)

    def _output_ready(self) -> None:
        pass  # _flush takes core.take_ready() at the end of the turn: many batches, one write

    def _turn_wanted(self) -> None:
        self._turn_due = True  # _run_once calls _end_turn after the next select()

    def _spawn(self, job: Callable[[], Awaitable[None]]) -> None:
        self.call_soon(lambda: self._run_inline(job()))  # not inside the batch that asked

    def _hooks_waiting(self) -> None:
        self.call_soon(self._run_hooks)

    def _run_hooks(self) -> None:
        self._run_inline(self._run_queued_hooks())
        if self._hooks_queued:  # the runner was cancelled: drop the rest, or they never run
            self._drop_queued_hooks()

    def _run_inline(self, coroutine: Awaitable[None]) -> None:
        """No event loop here: run a coroutine to its end, or cancel it if it suspends."""
        assert inspect.iscoroutine(coroutine)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        coroutine.close()
        logger.error("a coroutine hook or verdict awaited I/O, which needs an event loop: cancelled")

    def _arm(self, deadline: float | None) -> None:
        self._deadline = deadline  # the next select() times out then (always on the loop's thread)

    def _abort_all(self) -> None:
        self._stopped = True  # serve_forever re-raises self.failure
        self._close_all()


# ---------------------------------------------------------------------- the command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit status 2, as `tank serve`
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="selectors_server", description="A Tank server on selectors.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0)
    parser.add_argument("--close-timeout", type=float, default=2.0)
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: invalid port {args.port} (want 0-65535)")
    try:  # ServerConfig checks the rest: finite seconds > 0, timeout > interval
        config = ServerConfig(
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            close_timeout=args.close_timeout,
            broker=None if args.redis_url is None else BrokerConfig.from_url(args.redis_url),
        )
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = SelectorsServer(config, args.host, args.port)
    except OSError as exc:
        print(f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr, flush=True)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):  # the handler only queues: safe anywhere
        signal.signal(signum, lambda _signum, _frame: server.shutdown())
    sys.stdout.write(f"tank: serving {server.url} (backend selectors)\n")
    sys.stdout.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
