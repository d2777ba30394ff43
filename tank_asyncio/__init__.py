"""Tank for Python on asyncio: the sans-IO core over asyncio sockets (see issue: adapters)."""

__all__: list[str] = []
