"""Turn routing predictions into ordered loads on the copy engine, ahead of use.

The prefetcher is a model observer (it sees each layer's residual) and a partner of the offloaded
expert backend, which folds its predictions into the layer's single device->host read:

  on_residual(l, x)   keep x [N, H] (decode: N == 1)
  predict(l)          device tensor [n * take] of predicted expert ids for layers l+1..l+n (no sync)
  issue(l, ids)       after layer l's own experts are pinned: the host ids become the plan

The plan holds each predicted layer's top-(k + margin) experts, nearest layer first, then by score.
It replaces the previous plan: superseded loads not issued yet are dropped, and superseded in-flight
prefetches none of whose chunks reached the link yet are cancelled (engines with a link scheduler).
At most `max_inflight` prefetches are in flight at once (default 1). Each prefetch carries its
expected value, P(use) / layers until use, with P(use) = 1 for the k top-scored experts of a layer
and halving per rank beyond (the host sees ranks, not scores): engines with a link scheduler
(offload.link) copy prefetches in that order, in chunks, after every demand load, so with a wider
window the link stays busy without a demand load waiting behind more than one prefetch chunk.
The plan's experts are protected from eviction by prefetches and feed the `predictive` policy's
next-use distances.

A token's first layers are planned before its forward pass starts, from the token id alone
(`Predictor.first_layers`: next-gate on the token's embedding, precomputed for the vocabulary).
A predictor with `cross_token = True` also scores layers past the last one (the next token's layers
0, 1, ..., as rows lookahead > L-1-l): its plans then reach across the token boundary, and the plan
made at the previous token's last layers is kept at the token's start, behind the first-layer
predictions from the token id (they know the token: sharper for the first layers, 0.95 vs 0.44
recall at layer 0 on the bundled model; the carried rows are sharper from its layer 3 on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .cache import ExpertCache
from .policy import Predictive
from .protocols import Key, Predictor


class Prefetcher:
    """A model observer (model.observers.LayerObserver, structurally) that prefetches predicted experts."""

    def __init__(self, cache: ExpertCache, predictor: Predictor, num_layers: int, top_k: int,
                 margin: int = 0, max_inflight: int = 1, rank_depth: int | None = None):
        """rank_depth: experts ranked per predicted layer (default top_k + margin, the ones loaded);
        deeper ranks are not loaded but give the `predictive` policy an expected next use for more
        residents (distance / P(use), P halving per rank past top_k)."""
        if max_inflight < 1 or margin < 0:
            raise ValueError(f"prefetch window must be >= 1 and margin >= 0, got {max_inflight}, {margin}")
        self.cache, self.predictor = cache, predictor
        self.num_layers, self.lookahead = num_layers, predictor.lookahead
        self.take = min(top_k + margin, cache.num_experts)
        if rank_depth is not None and rank_depth < 1:
            raise ValueError(f"rank_depth must be >= 1, got {rank_depth}")
        self.depth = min(cache.num_experts, max(self.take, rank_depth or 0))  # ranked per layer >= loaded
        self.top_k = top_k
        self.value: dict[Key, float] = {}
        self.cancelled_inflight = 0
        self.cross_token = bool(predictor.cross_token)
        self.margin, self.max_inflight = margin, max_inflight
        self.pending: list[Key] = []
        self._dist: dict[Key, int] = {}  # the current plan: key -> layers until use from its layer
        self._ahead: list[tuple[Key, int]] = []  # its keys in later tokens, distance from the next token's start
        self.protect: set[Key] = set()
        self.cancelled = 0
        self.issued = 0
        self._x: torch.Tensor | None = None
        self._pos = 0

    def reset(self) -> None:
        """Forget the current plan (after an interrupted step; the cache recovered separately)."""
        self.pending, self.protect, self.value, self._x, self._ahead = [], set(), {}, None, []

    # --- model observer -------------------------------------------------------------------------
    def on_step(self, input_ids: torch.Tensor, start_pos: int, host_ids: Sequence[int] | None) -> None:
        self._pos, self._x = start_pos, None
        if host_ids is not None and len(host_ids) == 1:  # decode: plan this token's first layers now
            top = self.predictor.first_layers(int(host_ids[0]), start_pos, self.take)  # [D', take]
            first = [((t, int(e)), t + 1) for t in range(top.shape[0]) for e in top[t]]
            # a cross-token plan from the previous token's last layer scored this token's layers at
            # distance t + 1 from there, which is their distance from here too
            self._set_plan(first + (self._ahead if self.cross_token else []))
            self._ahead = []  # carried once: a token without a plan (issue) must not carry it again
        else:
            self._ahead = []

    def on_residual(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        self.predictor.observe(layer, x, start_pos)  # one that reads earlier positions sees every residual
        self._x = x if x.shape[0] == 1 else None  # prefetch plans are made in decode only

    def on_routing(self, layer, ids, weights, logits, start_pos) -> None:
        return None

    # --- the offloaded backend's side -----------------------------------------------------------
    def targets(self, layer: int) -> int:
        """How many layers ahead of `layer` are predicted (0 at the last layers unless cross-token)."""
        if self.cross_token:
            return self.lookahead
        return max(0, min(self.lookahead, self.num_layers - 1 - layer))

    def predict(self, layer: int) -> torch.Tensor | None:
        """Predicted ids [n * take] for layers layer+1..layer+n, on the device; None when not decoding."""
        n = self.targets(layer)
        if self._x is None or n == 0:
            return None
        scores = self.predictor.scores(layer, self._x, self._pos)[0, :n]  # [n, E]
        return torch.topk(scores.float(), self.depth, dim=-1).indices.reshape(-1)  # [n * depth]

    def issue(self, layer: int, ids: np.ndarray) -> None:
        """ids [n * depth] (host): predictions from `predict(layer)`; plan them and start loads."""
        self._x = None
        L, depth = self.num_layers, self.depth
        self._set_plan([(((layer + 1 + i // depth) % L, int(e)), 1 + i // depth) for i, e in enumerate(ids)])
        if self.cross_token:
            self._ahead = self._ahead_from(layer)

    @property
    def _plan(self) -> list[tuple[Key, int]]:
        """The current plan as (key, layers until its use), in plan order."""
        return list(self._dist.items())

    def _ahead_from(self, layer: int) -> list[tuple[Key, int]]:
        """The current plan's keys past the token's last layer, with their distance from the token's
        start (the next token's layer t at distance t + 1)."""
        shift = self.num_layers - 1 - layer
        return [(key, d - shift) for key, d in self._dist.items() if d > shift]

    # --- planning -------------------------------------------------------------------------------
    def _set_plan(self, ahead: list[tuple[Key, int]]) -> None:
        """ahead: (key, layers until its use), nearest first; a key planned twice keeps its most valuable use.
        Each planned load's value is P(use) / (layers until use): P(use) is 1 for the first top_k
        keys of a layer, halving per rank beyond (the plan lists a layer's experts by falling score)."""
        dist: dict[Key, int] = {}
        value: dict[Key, float] = {}
        rank: dict[int, int] = {}
        load: list[Key] = []  # the first `take` ranks of each layer; deeper ranks inform eviction only
        top_k, take = self.top_k, self.take
        loading: set[Key] = set()
        predictive = isinstance(self.cache.policy, Predictive)
        next_use: dict[Key, float] = {}  # expected layers until use, distance / P(use): predictive only
        for key, d in ahead:
            r = rank.get(d, 0)
            rank[d] = r + 1
            p = 1.0 if r < top_k else 0.5 ** (r - top_k + 1)
            v = p / max(1, d)
            if v > value.get(key, 0.0):  # planned twice (this token and a later one): the likelier use
                dist[key], value[key] = d, v
                if predictive:
                    next_use[key] = max(1, d) / p
            if r < take and key not in loading:
                loading.add(key)
                load.append(key)
        self._dist = dist
        self.cancelled += sum(1 for key in self.pending if key not in loading)
        self.pending = load
        self.protect = loading
        self.value = value
        if self.cache.inflight:
            self._replan_inflight()
        if predictive:
            self.cache.policy.set_next_use(next_use)
        self.pump()

    def _replan_inflight(self) -> None:
        """Cancel in-flight prefetches the new plan dropped; re-rank the ones it kept."""
        for key, handle in list(self.cache.inflight.items()):
            if not handle.prefetch:
                continue
            if key not in self.protect:
                if self.cache.cancel_prefetch(key):
                    self.cancelled_inflight += 1
            else:  # nearer now: its value under the new plan
                self.cache.engine.reprioritize(handle, self.value[key])

    def pump(self) -> None:
        """Issue pending loads, nearest first, while the in-flight window has room."""
        cache = self.cache
        room, protect, i = 0, None, 0
        pending = self.pending
        while i < len(pending):
            if room <= 0:  # finished loads leave the window only when looked at
                room = self.max_inflight - cache.inflight_count()
                if room <= 0:
                    break
            key = pending[i]
            i += 1
            if cache.slot_of[key] >= 0:
                continue
            if protect is None:
                protect = self.protect | cache.pinned
            if not cache.prefetch(key, protect, priority=self.value.get(key, 0.0)):
                i = len(pending)  # nothing evictable for this one: later (lower-priority) ones neither
                break
            self.issued += 1
            room -= 1
        del pending[:i]
