"""Tank for Python on asyncio: the sans-IO core over asyncio sockets.

``async with tank_asyncio.serve(config, host, port, **hooks) as server:`` runs a server; leaving the
block shuts it down gracefully. See docs/embedding.md. uvloop is used by ``tank serve`` when it is
installed; embedded, the server runs on whatever loop is running.
"""

from ._server import Server, serve

__all__ = ["Server", "serve"]
