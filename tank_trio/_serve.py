"""Starting and stopping a trio server: ``serve`` for ``nursery.start``, ``serve_in`` for short.

docs/embedding.md: ``server = await nursery.start(tank_trio.serve, config, host, port)``. The
server's tasks (timer, accept loops, readers, writers, hook worker) run in a nursery behind a
shield; a guard task outside it turns a cancellation of the scope running ``serve`` into a graceful
shutdown, bounded by ``close_timeout`` + 1 s, and then lets the cancellation through. ``serve``
returns after ``await server.shutdown()`` and re-raises a failure of the core.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import trio

from tank_core import BrokerConfig, ConfigError, ServerConfig

from ._hooks import DEFAULT_QUEUE_SIZE, AuthHook, Hook, HookRunner, SubscribeHook
from ._server import Server

__all__ = ["serve", "serve_in"]


async def _shutdown_when_cancelled(server: Server) -> None:
    """Sits outside the shield: the scope running serve() is cancelled -> graceful shutdown."""
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        if not server._leaving:
            server._cancelled_from_outside = True
            with trio.CancelScope(shield=True), trio.move_on_after(server.config.close_timeout + 1):
                await server.shutdown()
        raise


async def serve(
    config: ServerConfig | None,
    host: str,
    port: int,
    *,
    authenticate: AuthHook | None = None,
    authorize_subscribe: SubscribeHook | None = None,
    on_connect: Hook | None = None,
    on_disconnect: Hook | None = None,
    on_message: Hook | None = None,
    on_error: Hook | None = None,
    on_event: Hook | None = None,
    hook_queue_size: int = DEFAULT_QUEUE_SIZE,
    redis_url: str | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Tank on ``host:port`` (0 picks a free port) until shut down.

    Use as ``server = await nursery.start(tank_trio.serve, config, host, port)`` (hooks through
    ``functools.partial``, or ``serve_in``). ``task_status.started(server)`` once listening.
    Returns after ``await server.shutdown()``; cancelling the scope that runs it shuts down
    gracefully first, then lets the cancellation through. Re-raises a failure of the core.
    ``hook_queue_size`` bounds the queue of coroutine-hook events (docs/embedding.md).
    ``redis_url="redis://HOST:PORT/DB"`` makes it one node of a cluster (docs/scale-out.md).
    """
    if isinstance(hook_queue_size, bool) or not isinstance(hook_queue_size, int) or hook_queue_size <= 0:
        raise ConfigError(f"hook_queue_size must be an integer > 0, got {hook_queue_size!r}")
    if redis_url is not None:
        config = replace(config or ServerConfig(), broker=BrokerConfig.from_url(redis_url))
    hooks = HookRunner(
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        on_message=on_message,
        on_error=on_error,
        on_event=on_event,
        queue_size=hook_queue_size,
    )
    server = Server(
        config, authenticate=authenticate, authorize_subscribe=authorize_subscribe, hooks=hooks
    )
    await server._listen(host, port)
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(_shutdown_when_cancelled, server, name="tank shutdown guard")
            # Connection tasks, the timer and the hook worker live behind a shield, so that a
            # cancelled caller still gets a graceful shutdown; they end when the server stops.
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    server._start(nursery)
                    task_status.started(server)
                    await server._stopped.wait()
                    nursery.cancel_scope.cancel()
            if not server._cancelled_from_outside:
                server._leaving = True
                outer.cancel_scope.cancel()
    finally:
        server._close_listeners()
        for conn in list(server._conns.values()):
            server._kill(conn)
    if server._failure is not None:
        raise server._failure


async def serve_in(
    nursery: trio.Nursery,
    config: ServerConfig | None,
    host: str,
    port: int,
    **hooks: Any,
) -> Server:
    """Start ``serve`` in ``nursery`` with keyword hooks; returns the listening ``Server``."""
    server = await nursery.start(functools.partial(serve, config, host, port, **hooks))
    if not isinstance(server, Server):  # pragma: no cover - nursery.start is typed Any
        raise TypeError("serve() did not report a Server")
    return server
