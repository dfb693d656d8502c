"""Eviction policies: each picks a victim among the evictable resident experts it is shown.

Keys are (layer, expert). The cache tells a policy about accesses, inserts and evictions; which
residents are candidates (global pool vs the layer's own share, pinned ones excluded) is the cache's job.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterable

import numpy as np

from ..errors import MoeOffloadError
from .protocols import Key


class EvictionPolicy(ABC):
    """Base: least-recently-used bookkeeping that every policy keeps (also its tie-breaker)."""

    name = "base"
    per_layer = False  # True: each layer owns an equal share of the slots

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}
        self.stamp: np.ndarray | None = None  # [L, E] last use, once bound to a cache's shape

    def bind(self, num_layers: int, num_experts: int) -> None:
        """Keep array twins of the bookkeeping for `pick` (vectorised victim choice)."""
        self.stamp = np.zeros((num_layers, num_experts), dtype=np.int64)

    def _touch(self, key: Key) -> None:
        self.clock += 1
        self.last_use[key] = self.clock
        if self.stamp is not None:
            self.stamp[key] = self.clock

    def pick(self, flat: np.ndarray) -> int | None:
        """The victim among candidates given as flat indices l * E + e (numpy), or None when this
        policy has no array form (the cache then calls `victim` on keys). Same choice as `victim`."""
        return None

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

    def pick(self, flat: np.ndarray) -> int | None:
        if self.stamp is None:
            return None
        return int(flat[np.argmin(self.stamp.reshape(-1)[flat])])  # stamps are unique: same as victim


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
        self.count_arr: np.ndarray | None = None

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.count_arr = np.zeros((num_layers, num_experts), dtype=np.int64)

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.count[key] = self.count.get(key, 0) + 1
        if self.count_arr is not None:
            self.count_arr[key] += 1

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last_use.get(k, 0)))

    def pick(self, flat: np.ndarray) -> int | None:
        if self.stamp is None:
            return None
        order = np.lexsort((self.stamp.reshape(-1)[flat], self.count_arr.reshape(-1)[flat]))
        return int(flat[order[0]])  # fewest uses, then least recent


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

    def pick(self, flat: np.ndarray) -> int | None:
        if self.stamp is None:
            return None
        E = self.stamp.shape[1]
        nu = np.full(len(flat), math.inf)
        if self.next_use:
            get = self.next_use.get
            nu = np.array([get((int(i) // E, int(i) % E), math.inf) for i in flat], dtype=np.float64)
        order = np.lexsort((self.stamp.reshape(-1)[flat], -nu))
        return int(flat[order[0]])  # farthest predicted use, then least recent


POLICIES = {cls.name: cls for cls in (LRU, LRULayer, LFU, Predictive)}


def make_policy(name: str) -> EvictionPolicy:
    if not isinstance(name, str) or name not in POLICIES:
        raise MoeOffloadError(f"policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()
