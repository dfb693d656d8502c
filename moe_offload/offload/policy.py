"""Eviction policies: each picks a victim among the evictable resident experts it is shown.

Keys are (layer, expert). The cache tells a policy about accesses, inserts and evictions; which
residents are candidates (global pool vs the layer's own share, pinned ones excluded) is the cache's job.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterable

from ..errors import MoeOffloadError
from .protocols import Key


class EvictionPolicy(ABC):
    """Base: least-recently-used bookkeeping that every policy keeps (also its tie-breaker)."""

    name = "base"
    per_layer = False  # True: each layer owns an equal share of the slots

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self.clock += 1
        self.last_use[key] = self.clock

    def on_access(self, key: Key) -> None:
        """A use of a resident expert (every hit and every miss, once)."""
        self._touch(key)

    def on_insert(self, key: Key) -> None:
        """An expert entered the cache (a demand load, which on_access then counts, or a prefetch)."""
        self._touch(key)

    def on_evict(self, key: Key) -> None:
        self.last_use.pop(key, None)

    @abstractmethod
    def victim(self, candidates: Iterable[Key]) -> Key:
        """The candidate to evict (candidates are resident, unpinned, not in flight)."""


class LRU(EvictionPolicy):
    """Evict the resident expert used longest ago, over the whole pool."""

    name = "lru"

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: self.last_use.get(k, 0))


class LRULayer(LRU):
    """LRU within each layer's own equal share of the slots."""

    name = "lru-layer"
    per_layer = True


class LFU(EvictionPolicy):
    """Evict the resident expert with the fewest uses so far (all history); ties go to the LRU one."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last_use.get(k, 0)))


class Predictive(EvictionPolicy):
    """Evict the resident expert whose predicted next use is farthest away.

    `set_next_use({key: distance})` takes the predictor's view (in layer steps); experts with no
    prediction count as infinitely far. With no predictions at all it is exactly LRU.
    """

    name = "predictive"

    def __init__(self) -> None:
        super().__init__()
        self.next_use: dict[Key, float] = {}

    def set_next_use(self, next_use: dict[Key, float]) -> None:
        self.next_use = dict(next_use)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return max(candidates, key=lambda k: (self.next_use.get(k, math.inf), -self.last_use.get(k, 0)))


POLICIES = {cls.name: cls for cls in (LRU, LRULayer, LFU, Predictive)}


def make_policy(name: str) -> EvictionPolicy:
    if not isinstance(name, str) or name not in POLICIES:
        raise MoeOffloadError(f"policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()
