"""Which topics keep a history of their publications, and for how long (``ServerConfig.history``).

Off by default. ``History(keep=HistoryPolicy(size=100, ttl=300.0))`` keeps the last 100
publications of every topic for 5 minutes; ``prefixes`` gives topics starting with a prefix their
own policy (the longest matching prefix wins; ``None`` keeps nothing for them). The store itself is
``tank_core/server/history_store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._checks import positive, positive_int
from .errors import ConfigError

__all__ = ["History", "HistoryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryPolicy:
    """How much of one topic's past is kept: at most ``size`` publications, none older than
    ``ttl`` seconds."""

    size: int = 100
    ttl: float = 300.0

    def __post_init__(self) -> None:
        positive_int("size", self.size)
        positive("ttl", self.ttl)


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    """Per-topic history of publications, with offsets and an epoch (docs: history)."""

    #: The policy of topics no prefix matches; None: no history for them.
    keep: HistoryPolicy | None = field(default_factory=HistoryPolicy)
    #: Topic prefix -> its policy (None: no history), the longest matching prefix winning.
    prefixes: Mapping[str, HistoryPolicy | None] = field(default_factory=dict)
    #: Topics whose offsets are remembered at most; past it the least recently published topic
    #: is forgotten, and its next publication starts a new epoch.
    max_topics: int = 100_000

    def __post_init__(self) -> None:
        if self.keep is not None and not isinstance(self.keep, HistoryPolicy):
            raise ConfigError("history keep must be a HistoryPolicy or None")
        if not isinstance(self.prefixes, Mapping) or not all(
            isinstance(prefix, str) and (policy is None or isinstance(policy, HistoryPolicy))
            for prefix, policy in self.prefixes.items()
        ):
            raise ConfigError("history prefixes must map topic prefixes to a HistoryPolicy or None")
        object.__setattr__(self, "prefixes", dict(self.prefixes))
        positive_int("max_topics", self.max_topics)

    def policy_for(self, topic: str) -> HistoryPolicy | None:
        """The policy of ``topic``: its longest matching prefix's, else ``keep``."""
        best: str | None = None
        for prefix in self.prefixes:
            if topic.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return self.keep if best is None else self.prefixes[best]
