"""Tank for Python on trio: the sans-IO core over trio sockets (see issue: adapters)."""

__all__: list[str] = []
