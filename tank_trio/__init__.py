"""Tank for Python on trio: the sans-IO core over trio sockets, with one timer task per server.

    async with trio.open_nursery() as nursery:
        server = await nursery.start(tank_trio.serve, config, "127.0.0.1", 8080)
        server.publish("news", "hello")

Cancelling the scope that runs ``serve`` shuts the server down gracefully. See docs/embedding.md.

``async with tank_trio.connect(url, ...) as client:`` is the client: heartbeat, reconnect with
backoff, topics resubscribed after every reconnect; the same API as ``tank_asyncio.connect``. See
docs/client.md.
"""

from tank_core.server.hooks import Hook, SubscribeHook
from tank_core.server.session import AuthHook

from ._client import Client, MessageStream, connect
from ._server import Server, serve, serve_in

__all__ = [
    "AuthHook", "Client", "Hook", "MessageStream", "Server", "SubscribeHook", "connect", "serve", "serve_in",
]
