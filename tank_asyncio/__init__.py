"""Tank for Python on asyncio: the sans-IO core over asyncio sockets.

``async with tank_asyncio.serve(config, host, port, **hooks) as server:`` runs a server; leaving the
block shuts it down gracefully. See docs/embedding.md. uvloop is used by ``tank serve`` when it is
installed; embedded, the server runs on whatever loop is running.

``async with tank_asyncio.connect(url, ...) as client:`` is the client: heartbeat, reconnect with
backoff, topics resubscribed after every reconnect. See docs/client.md.
"""

from ._client import Client, MessageStream, connect
from ._server import Server, serve

__all__ = ["Client", "MessageStream", "Server", "connect", "serve"]
