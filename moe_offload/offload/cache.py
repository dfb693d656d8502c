"""Device tier: a slot pool allocated once, the residency table, eviction, demand loads, stats."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import MoeOffloadError
from .pagecache import PageCacheProbe
from .policy import EvictionPolicy
from .protocols import CopyEngine, ExpertStore, Key
from .stats import CacheStats
from .transfer import CopyFailed, LoadHandle


class ExpertCache:
    """A fixed pool of expert slots on the device and which (layer, expert) each slot holds.

    - `pool` [S, row] is one tensor; `layer_views[l]` = (w13 [S, 2I, H], w2 [S, H, I]) are views of it
      as layer l's format lays its experts out (the same views for every layer unless a GGUF file's
      layers differ: then a row is as long as the largest layer's, and a slot holding an expert of
      layer l uses its first row_lengths[l] elements), so kernels read experts straight from the pool.
    - `slot_table` [L, E] int32 on the device (-1: not resident) mirrors the host table `slot_of`;
      row l is refreshed when layer l acquires experts, before any kernel of layer l reads it, by a
      non-blocking copy from a pinned host row (no host sync). The pinned row of layer l is rewritten
      only at layer l's next acquire, after that layer's routed ids were read back, which waited for
      everything queued before them on the compute stream, the previous copy of that row included.
    - `acquire(layer, experts)` makes experts resident (demand loads for misses, waits for their
      copies) and pins them; `release` unpins them and fences their slots. Pinned experts and experts
      with a copy in flight are never evicted.
    """

    def __init__(self, store: ExpertStore, num_slots: int, policy: EvictionPolicy, device: torch.device,
                 engine: CopyEngine):
        L, E = store.num_layers, store.num_experts
        self.store, self.policy, self.device, self.engine = store, policy, torch.device(device), engine
        self.num_layers, self.num_experts, self.num_slots = L, E, num_slots
        if policy.per_layer and num_slots < L:
            raise MoeOffloadError(f"policy {policy.name!r} needs at least one slot per layer ({L}); got {num_slots}")
        self.pool = store.allocate_pool(num_slots, self.device)  # [S, row]
        formats = getattr(store, "formats", None) or [None] * L
        views: dict[int, tuple] = {}  # one pair of views per distinct format
        self.layer_views = [views.setdefault(id(f), store.pool_views(self.pool, l) if f is not None
                                             else store.pool_views(self.pool)) for l, f in enumerate(formats)]
        self._row_len = list(getattr(store, "row_lengths", [self.pool.shape[1]] * L))  # a layer's slot elements
        self._layer_bytes = list(getattr(store, "layer_bytes", [store.expert_bytes] * L))
        self.slot_table = torch.full((L, E), -1, dtype=torch.int32, device=self.device)  # [L, E]
        self.slot_of = np.full((L, E), -1, dtype=np.int64)  # host mirror, the authority
        self.resident_flat = np.zeros(L * E, dtype=bool)  # [L*E] slot_of >= 0, kept in step with it
        pin = self.device.type == "cuda"
        self._slot_rows = torch.full((L, E), -1, dtype=torch.int32, pin_memory=pin)  # staging for slot_table
        self.key_of_slot: list[Key | None] = [None] * num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.resident_per_layer = np.zeros(L, dtype=np.int64)
        base, extra = divmod(num_slots, L)
        self.quota = np.array([base + (l < extra) for l in range(L)]) if policy.per_layer else None
        self.pinned: set[Key] = set()
        self.inflight: dict[Key, LoadHandle] = {}
        self.prefetched_unused: set[Key] = set()
        self._loading: Key | None = None
        self._dirty_rows: set[int] = set()
        self.stats = CacheStats(L)
        # a memory-mapped store (GGUF): each load asks the OS how much of its row is outside the page cache
        self.page_probe = PageCacheProbe() if getattr(store, "mapped", False) else None
        self.stats.page_cache = self.page_probe.method if self.page_probe is not None else None
        policy.bind(L, E)
        self.late_hits = np.zeros(L, dtype=np.int64)  # hits that had to wait for their copy (simulation)

    # --- capacity -----------------------------------------------------------------------------
    def capacity(self, layer: int) -> int:
        """How many experts of `layer` can be resident at once."""
        return int(self.quota[layer]) if self.quota is not None else self.num_slots

    def fit_groups(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """Split a layer's needed experts (ascending) into groups that fit its capacity at once.
        (Slots held by in-flight prefetches still count: a demand load waits for such a copy, then
        takes its slot.)"""
        cap = self.capacity(layer)
        experts = list(experts)
        return [experts[i:i + cap] for i in range(0, len(experts), cap)]

    def is_resident(self, layer: int, e: int) -> bool:
        return self.slot_of[layer, e] >= 0

    def resident(self) -> list[Key]:
        return [k for k in self.key_of_slot if k is not None]

    def inflight_count(self) -> int:
        """Loads started and not yet finished (after reaping the finished ones)."""
        self.reap()
        return len(self.inflight)

    def reap(self) -> None:
        """Retire finished loads nobody waited for yet (prefetches): their slots become evictable.
        A failed one is dropped from the cache; its error surfaces only if the expert is needed."""
        for key, handle in list(self.inflight.items()):
            if handle.done():
                del self.inflight[key]
                if handle.error is not None:
                    self._drop(key)

    # --- the demand path ------------------------------------------------------------------------
    def acquire(self, layer: int, experts: Iterable[int]) -> None:
        """Make every expert resident and pinned, counting hits and misses; wait for their copies."""
        stats = self.stats
        keys = [(layer, int(e)) for e in experts]
        self.pinned.update(keys)
        try:
            for key in keys:
                stats.uses[layer] += 1
                if self.slot_of[key] >= 0:
                    stats.hits[layer] += 1
                    handle = self.inflight.get(key)
                    if handle is not None and not handle.done():
                        self.late_hits[layer] += 1  # resident, but its copy is still on the link
                    if key in self.prefetched_unused:
                        stats.prefetch_hits[layer] += 1
                        self.prefetched_unused.discard(key)
                else:
                    stats.misses[layer] += 1
                    self._start_load(key)
                self.policy.on_access(key)
            inflight = self.inflight
            for key in keys:
                if key in inflight:
                    self._wait_demand(key)
        except BaseException:
            self.pinned.difference_update(keys)
            raise
        if layer in self._dirty_rows:
            row = self._slot_rows[layer]
            row.copy_(torch.from_numpy(self.slot_of[layer]))  # host -> pinned host: no device work
            self.slot_table[layer].copy_(row, non_blocking=True)
            self._dirty_rows.discard(layer)

    def release(self, layer: int, experts: Iterable[int]) -> None:
        """Compute on these experts has been issued: unpin them and fence their slots."""
        for e in experts:
            key = (layer, int(e))
            self.pinned.discard(key)
            self.engine.fence(int(self.slot_of[key]))

    def slot_list(self, layer: int) -> np.ndarray:
        """Host copy of layer's slot table row [E] (for backends that loop on the host)."""
        return self.slot_of[layer]

    def reset_stats(self) -> None:
        """Start a new statistics window. Loads still in flight were counted in the old one: a later
        cancellation of one takes nothing back from the new window's bytes."""
        self.stats.reset()
        for handle in self.inflight.values():
            handle.page_cache = None
            handle.counted = False

    def drain_stalls(self) -> None:
        """Fold device-measured stalls (CUDA engine) into the stats."""
        for layer, seconds in self.engine.drain_stalls():
            self.stats.stall_seconds[layer] += seconds

    def close(self) -> None:
        """Finish in-flight copies and stop the copy engine."""
        self.clear()
        self.engine.close()

    # --- internals ------------------------------------------------------------------------------
    def prefetch(self, key: Key, protect: set[Key], priority: float = 0.0, fill: bool = False) -> bool:
        """Start loading `key` ahead of its use unless it is resident or no slot can be taken without
        evicting a protected (predicted, pinned or in-flight) expert. Returns whether a load started.
        fill: a background copy of an expert the CPU lane computed, not a prediction (not counted as a
        prefetch in the stats)."""
        if self.slot_of[key] >= 0:
            return False
        slot = self._take_slot(key[0], protect, incoming=key)
        if slot is None:
            return False
        self._start_load(key, prefetch=True, slot=slot, priority=priority)
        if fill:
            self.prefetched_unused.discard(key)
        return True

    def cancel_prefetch(self, key: Key) -> bool:
        """Cancel an in-flight prefetch of `key` that no chunk of has reached the link yet (engines
        with a link scheduler only): its slot is freed and the bytes never sent are not counted."""
        handle = self.inflight.get(key)
        if handle is None or not handle.prefetch or key in self.pinned:
            return False
        unsent = self.engine.cancel(handle)
        if unsent is None:
            return False
        del self.inflight[key]
        if getattr(handle, "counted", True):  # its bytes are in this statistics window
            self.stats.bytes_h2d[key[0]] -= unsent
        seen = getattr(handle, "page_cache", None)
        if seen is not None and unsent == self._layer_bytes[key[0]]:  # nothing of it was read
            self.stats.page_cache_checked_bytes[key[0]] -= seen[0]
            self.stats.page_cache_miss_bytes[key[0]] -= seen[1]
        self._drop(key)
        return True

    def _start_load(self, key: Key, prefetch: bool = False, slot: int | None = None, priority: float = 0.0) -> None:
        slot = self._take_slot(key[0]) if slot is None else slot
        self._loading = key  # until its handle is recorded: recover() cannot trust this slot's bytes
        self.slot_of[key] = slot
        self.resident_flat[key[0] * self.num_experts + key[1]] = True
        self.key_of_slot[slot] = key
        self.resident_per_layer[key[0]] += 1
        self._dirty_rows.add(key[0])
        self.policy.on_insert(key)
        row = self.store.row(*key)
        seen = self.page_probe.check(row) if self.page_probe is not None else None  # before the copy reads it
        handle = self.engine.load(key, row, self.pool[slot, :self._row_len[key[0]]], slot,
                                  prefetch=prefetch, priority=priority)
        self.inflight[key] = handle
        if seen is not None:
            self.stats.page_cache_checked_bytes[key[0]] += seen[0]
            self.stats.page_cache_miss_bytes[key[0]] += seen[1]
            handle.page_cache = seen  # a prefetch cancelled before any byte was read takes them back
        self._loading = None
        self.stats.bytes_h2d[key[0]] += self._layer_bytes[key[0]]
        if prefetch:
            self.prefetched_unused.add(key)

    def recover(self) -> None:
        """Bring the cache back to a consistent state after an exception (KeyboardInterrupt included)
        anywhere in a step: wait until the link is idle, unpin everything, retire every load, drop
        experts whose copy failed or whose load was interrupted before it was recorded, and rebuild
        the free-slot list from the slot table. Afterwards every resident expert holds its bytes."""
        self.engine.drain()
        self.pinned.clear()
        for key, handle in list(self.inflight.items()):
            del self.inflight[key]
            if not handle.done() or handle.error is not None:
                if self.slot_of[key] >= 0:
                    self._drop(key)
        if self._loading is not None and self.slot_of[self._loading] >= 0 and self._loading not in self.inflight:
            self._drop(self._loading)
        self._loading = None
        taken = {int(s) for s in self.slot_of[self.slot_of >= 0]}
        self.free_slots = [s for s in range(self.num_slots - 1, -1, -1) if s not in taken]
        self.key_of_slot = [None] * self.num_slots
        for (l, e) in zip(*np.nonzero(self.slot_of >= 0)):
            self.key_of_slot[int(self.slot_of[l, e])] = (int(l), int(e))
        self.resident_per_layer = (self.slot_of >= 0).sum(1).astype(np.int64)
        self.resident_flat = (self.slot_of >= 0).reshape(-1).copy()
        self._dirty_rows.update(range(self.num_layers))
        self.check()

    def check(self) -> None:
        """Assert the bookkeeping invariants (tests, and after recover())."""
        res = {(int(l), int(e)) for l, e in zip(*np.nonzero(self.slot_of >= 0))}
        slots = [int(self.slot_of[k]) for k in res]
        if len(set(slots)) != len(slots):
            raise AssertionError("expert cache: two experts share a slot")
        if set(self.free_slots) & set(slots) or len(self.free_slots) + len(slots) != self.num_slots:
            raise AssertionError("expert cache: free slots and resident experts do not partition the pool")
        if any(self.key_of_slot[s] != k for k, s in zip(res, slots)):
            raise AssertionError("expert cache: key_of_slot disagrees with slot_of")
        if not np.array_equal(self.resident_flat, (self.slot_of >= 0).reshape(-1)):
            raise AssertionError("expert cache: resident_flat disagrees with slot_of")
        if not self.pinned <= res or not set(self.inflight) <= res:
            raise AssertionError("expert cache: a pinned or in-flight expert is not resident")

    def _wait_demand(self, key: Key) -> None:
        """Wait for a needed expert's copy. A failed *prefetch* of it is not this caller's failure:
        the expert is loaded again on demand (and that copy's failure is)."""
        handle = self.inflight.get(key)
        was_prefetch = handle is not None and handle.prefetch
        try:
            self._wait(key)
        except CopyFailed:
            if not was_prefetch:
                raise
            layer = key[0]
            self.stats.hits[layer] -= 1  # counted a (prefetch) hit; it is a miss after all
            self.stats.prefetch_hits[layer] -= 1
            self.stats.misses[layer] += 1
            self._start_load(key)
            self._wait(key)

    def _wait(self, key: Key) -> None:
        handle = self.inflight.get(key)
        if handle is None:
            return
        try:
            self.stats.stall_seconds[key[0]] += self.engine.wait(handle)
        except CopyFailed:
            del self.inflight[key]
            self._drop(key)  # the slot holds garbage: forget it, so the cache stays consistent
            raise
        del self.inflight[key]

    def _take_slot(self, layer: int, protect: set[Key] | None = None, incoming: Key | None = None) -> int | None:
        """A slot for a new expert of `layer`: a free one, else the policy's victim among evictable
        residents (never pinned, in flight, or in `protect`). None if a prefetch (protect given; of
        `incoming`) finds nothing it may evict, or a victim the policy does not let it evict
        (`EvictionPolicy.admits`); a demand load that finds nothing is an error."""
        per_layer = self.quota is not None and self.resident_per_layer[layer] >= self.quota[layer]
        if not per_layer and self.free_slots:
            return self.free_slots.pop()
        fast = self._pick_victim(layer if per_layer else None, protect)
        if fast is not None:
            if incoming is not None and not self.policy.admits(fast, incoming):
                return None
            self._drop(fast)  # puts its slot back on top of free_slots
            return self.free_slots.pop()
        if per_layer:
            candidates = [(layer, int(e)) for e in np.flatnonzero(self.slot_of[layer] >= 0)]
        else:
            candidates = self.resident()
        unpinned = [k for k in candidates if k not in self.pinned]
        candidates = [k for k in unpinned if k not in self.inflight and (protect is None or k not in protect)]
        if not candidates and protect is None and unpinned:
            # A demand load may take the slot of a prefetch still on the link: cancel it if none of its
            # chunks is being copied, else wait for it to land, then evict it.
            victim = self.policy.victim(unpinned)
            if self.cancel_prefetch(victim):
                return self.free_slots.pop()
            try:
                self._wait(victim)
            except CopyFailed:
                pass  # a failed prefetch is not this demand's failure: its slot is simply free now
            candidates = [victim] if self.slot_of[victim] >= 0 else []
            if not candidates:  # the prefetch failed and was dropped: its slot is free now
                return self.free_slots.pop()
        if not candidates:
            if protect is not None:
                return None
            raise MoeOffloadError(f"expert cache: no evictable slot for layer {layer} "
                                  f"({self.num_slots} slots, {len(self.pinned)} pinned, {len(self.inflight)} in flight)")
        victim = self.policy.victim(candidates)
        if incoming is not None and not self.policy.admits(victim, incoming):
            return None
        slot = int(self.slot_of[victim])
        self._drop(victim)  # puts `slot` back on top of free_slots
        assert self.free_slots[-1] == slot
        return self.free_slots.pop()

    def _pick_victim(self, layer: int | None, protect: set[Key] | None) -> Key | None:
        """The policy's victim among evictable residents (of `layer`, or all), chosen on arrays: no scan
        over resident keys in Python. None when the policy has no array form or nothing is evictable
        (the caller then takes the general path, which may wait for an in-flight prefetch)."""
        E = self.num_experts
        lo = 0 if layer is None else layer * E  # the layer's own row only, when slots are per layer
        size = E if layer is not None else self.num_layers * E
        mask = self.resident_flat[lo: lo + size].copy()  # [size] resident
        for keys in (self.pinned, self.inflight, protect or ()):
            for (l, e) in keys:
                if lo <= l * E + e < lo + mask.size:
                    mask[l * E + e - lo] = False
        if not mask.any():
            return None
        i = self.policy.pick_masked(mask, lo)
        return None if i is None else (i // E, i % E)

    def _drop(self, key: Key) -> None:
        slot = int(self.slot_of[key])
        if key in self.prefetched_unused:
            self.stats.prefetch_wasted[key[0]] += 1
            self.prefetched_unused.discard(key)
        self.slot_of[key] = -1
        self.resident_flat[key[0] * self.num_experts + key[1]] = False
        self.key_of_slot[slot] = None
        self.resident_per_layer[key[0]] -= 1
        self._dirty_rows.add(key[0])
        self.policy.on_evict(key)
        self.free_slots.append(slot)

    def clear(self) -> None:
        """Evict everything (e.g. between benchmark runs). Waits for in-flight copies first."""
        for key in list(self.inflight):
            try:
                self._wait(key)
            except CopyFailed:
                pass
        for key in self.resident():
            self._drop(key)
        self.prefetched_unused.clear()
