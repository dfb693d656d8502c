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


_NEVER = np.iinfo(np.int64).max  # masks out non-candidates in an argmin


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

    def pick_masked(self, mask: np.ndarray, lo: int) -> int | None:
        """`pick` over the candidates given as a mask [n] of flat indices lo..lo+n-1 (at least one set)."""
        return self.pick(np.flatnonzero(mask) + lo)

    def on_access(self, key: Key) -> None:
        """A use of a resident expert (every hit and every miss, once)."""
        self._touch(key)

    def on_insert(self, key: Key) -> None:
        """An expert entered the cache (a demand load, which on_access then counts, or a prefetch)."""
        self._touch(key)

    def on_evict(self, key: Key) -> None:
        self.last_use.pop(key, None)

    def admits(self, victim: Key, incoming: Key) -> bool:
        """Whether a prefetch of `incoming` may evict `victim` (a demand load always may)."""
        return True

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

    def pick_masked(self, mask: np.ndarray, lo: int) -> int | None:
        if self.stamp is None:
            return None
        stamps = self.stamp.reshape(-1)[lo: lo + mask.size]
        return lo + int(np.argmin(np.where(mask, stamps, _NEVER)))


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
        self.order: np.ndarray | None = None

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.order = np.zeros((num_layers, num_experts), dtype=np.int64)  # count << 40 | last use (clock < 2^40)

    def on_access(self, key: Key) -> None:
        self.clock += 1  # _touch, inlined: this runs for every routed expert of every layer
        self.last_use[key] = self.clock
        n = self.count[key] = self.count.get(key, 0) + 1
        if self.stamp is not None:
            self.stamp[key] = self.clock
            self.order[key] = (n << 40) + self.clock  # uses, then recency, in one int

    def on_insert(self, key: Key) -> None:
        self._touch(key)
        if self.stamp is not None:
            self.order[key] = (self.count.get(key, 0) << 40) + self.clock

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last_use.get(k, 0)))

    def pick(self, flat: np.ndarray) -> int | None:
        if self.stamp is None:
            return None
        return int(flat[np.argmin(self.order.reshape(-1)[flat])])  # fewest uses, then least recent

    def pick_masked(self, mask: np.ndarray, lo: int) -> int | None:
        if self.stamp is None:
            return None
        return lo + int(np.argmin(np.where(mask, self.order.reshape(-1)[lo: lo + mask.size], _NEVER)))


class Predictive(EvictionPolicy):
    """Evict the resident expert whose predicted next use is farthest away.

    `set_next_use({key: distance})` takes the predictor's view (in layer steps); experts with no
    prediction count as infinitely far. With no predictions at all it is exactly LRU.
    """

    name = "predictive"

    def __init__(self) -> None:
        super().__init__()
        self.next_use: dict[Key, float] = {}
        self.next_use_arr: np.ndarray | None = None  # [L, E], inf where nothing is predicted

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        self.next_use_arr = np.full((num_layers, num_experts), math.inf)

    def set_next_use(self, next_use: dict[Key, float]) -> None:
        if self.next_use_arr is not None:
            for key in self.next_use:  # only the previous plan's entries are reset: no [L, E] pass
                self.next_use_arr[key] = math.inf
            for key, d in next_use.items():
                self.next_use_arr[key] = d
        self.next_use = dict(next_use)

    def victim(self, candidates: Iterable[Key]) -> Key:
        return max(candidates, key=lambda k: (self.next_use.get(k, math.inf), -self.last_use.get(k, 0)))

    def admits(self, victim: Key, incoming: Key) -> bool:
        """Not a resident expected to be used no later than the expert prefetched in its place."""
        wanted = self.next_use.get(incoming)
        return wanted is None or self.next_use.get(victim, math.inf) > wanted

    def pick(self, flat: np.ndarray) -> int | None:
        if self.stamp is None:
            return None
        if not self.next_use:  # nothing predicted: plain LRU
            return int(flat[np.argmin(self.stamp.reshape(-1)[flat])])
        nu = self.next_use_arr.reshape(-1)[flat]  # [n]
        far = flat[nu == nu.max()]  # farthest predicted use (inf: none predicted) ...
        return int(far[np.argmin(self.stamp.reshape(-1)[far])])  # ... then least recent


POLICIES = {cls.name: cls for cls in (LRU, LRULayer, LFU, Predictive)}


def make_policy(name: str) -> EvictionPolicy:
    if not isinstance(name, str) or name not in POLICIES:
        raise MoeOffloadError(f"policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()
