"""``wss://`` for the trio server: the TLS handshake, then one reader and one writer over a
``trio.SSLStream`` per connection.

The plain-TCP pump (``_server.py``) writes with non-blocking ``send`` calls from the flusher; TLS
bytes have to go through the stream's state machine instead, so a TLS connection's writer sends
everything (the flusher only wakes it). The core is told about the socket only once the
handshake has succeeded, within ``request_timeout``: a client that fails or stalls it costs
nothing lasting.
"""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import Abort, current_task, wait_task_rescheduled

from tank_core.events import BytesReceived

from ._connection import Connection, describe

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["serve_tls_connection"]


async def serve_tls_connection(
    server: Server, stream: trio.SocketStream, context: ssl.SSLContext, timeout: float
) -> None:
    """One accepted TCP connection of a ``wss://`` server: handshake, then read until it ends."""
    tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    with trio.move_on_after(timeout) as handshake:
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            handshake.cancel()  # not TLS, a bad certificate, a reset: nobody to serve
    if handshake.cancelled_caught:
        await trio.aclose_forcefully(tls)
        return
    try:
        peer = stream.socket.getpeername()
    except OSError:
        await trio.aclose_forcefully(tls)
        return
    conn_id = server._accept(peer[0] if isinstance(peer, tuple) else str(peer))
    if conn_id is None:  # the server failed
        await trio.aclose_forcefully(tls)
        return
    conn = server._conns[conn_id] = Connection(conn_id, stream.socket)  # type: ignore[arg-type]
    conn.tls = tls
    server._nursery.start_soon(_writer, server, conn, name=f"tank tls writer {conn_id}")
    await _reader(server, conn, tls)


async def _reader(server: Server, conn: Connection, tls: trio.SSLStream[trio.SocketStream]) -> None:
    error = None
    try:
        while not conn.dead:
            if conn.resume is not None:
                await conn.resume.wait()
                continue
            data = await tls.receive_some(65536)
            if not data:  # the peer closed: the writer sends what is queued, then closes
                conn.eof = True
                return server._wake(conn.conn_id)
            server._event(BytesReceived(conn_id=conn.conn_id, data=bytes(data),
                                        now=trio.current_time(), wall_time=time.time()))
    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
        error = None if conn.dead else describe(exc)
    server._gone(conn, error)


async def _writer(server: Server, conn: Connection) -> None:
    """Whatever the core has for this connection, through the TLS stream; closes when the core
    says so (TLS has no half-close to linger with: close_notify, then the socket)."""
    tls = conn.tls
    assert tls is not None
    core, parked, me = server._core, server._parked, current_task()
    conn_id = conn.conn_id

    def abort(_raise_cancel: object) -> Abort:
        parked.pop(conn_id, None)
        return Abort.SUCCEEDED

    error = None
    try:
        while not conn.dead:
            data = conn.pending or core.data_to_send(conn_id)
            conn.pending = b""
            if core.turn_wanted:
                server._turn_wanted()  # an HTTP answer taken lets its next requests go on
            if data:
                await tls.send_all(data)
            elif data is None or conn.eof:
                with trio.move_on_after(server.config.close_timeout):
                    await tls.aclose()  # close_notify, then the socket
                break
            else:
                parked[conn_id] = me
                await wait_task_rescheduled(abort)  # until the flusher (or _kill) wakes it
    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
        error = None if conn.dead else describe(exc)
    except Exception as exc:  # data_to_send failed: a bug in shared state
        server._fail(exc)
    server._gone(conn, error, write_failed=error is not None)
