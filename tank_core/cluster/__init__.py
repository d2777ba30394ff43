"""Scale-out on Redis (docs/scale-out.md): the broker link, the envelope between nodes, RESP."""

from .link import BrokerLink, LinkState

__all__ = ["BrokerLink", "LinkState"]
