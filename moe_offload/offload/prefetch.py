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
0, 1, ..., as rows lookahead > L-1-l): its plans then reach across the token boundary.
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
                 margin: int = 0, max_inflight: int = 1):
        if max_inflight < 1 or margin < 0:
            raise ValueError(f"prefetch window must be >= 1 and margin >= 0, got {max_inflight}, {margin}")
        self.cache, self.predictor = cache, predictor
        self.num_layers, self.lookahead = num_layers, predictor.lookahead
        self.take = min(top_k + margin, cache.num_experts)
        self.top_k = top_k
        self.value: dict[Key, float] = {}
        self.cancelled_inflight = 0
        self.cross_token = bool(getattr(predictor, "cross_token", False))
        self.margin, self.max_inflight = margin, max_inflight
        self.pending: list[Key] = []
        self.protect: set[Key] = set()
        self.cancelled = 0
        self.issued = 0
        self._x: torch.Tensor | None = None
        self._pos = 0
        self._observe = getattr(predictor, "observe", None)

    def reset(self) -> None:
        """Forget the current plan (after an interrupted step; the cache recovered separately)."""
        self.pending, self.protect, self.value, self._x = [], set(), {}, None

    # --- model observer -------------------------------------------------------------------------
    def on_step(self, input_ids: torch.Tensor, start_pos: int, host_ids: Sequence[int] | None) -> None:
        self._pos, self._x = start_pos, None
        if host_ids is not None and len(host_ids) == 1:  # decode: plan this token's first layers now
            top = self.predictor.first_layers(int(host_ids[0]), start_pos, self.take)  # [D', take]
            self._set_plan([((t, int(e)), t + 1) for t in range(top.shape[0]) for e in top[t]])

    def on_residual(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        if self._observe is not None:  # a predictor that reads earlier positions sees every residual
            self._observe(layer, x, start_pos)
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
        return torch.topk(scores.float(), self.take, dim=-1).indices.reshape(-1)  # [n * take]

    def issue(self, layer: int, ids: np.ndarray) -> None:
        """ids [n * take] (host): predictions from `predict(layer)`; plan them and start loads."""
        self._x = None
        L = self.num_layers
        self._set_plan([(((layer + 1 + i // self.take) % L, int(e)), 1 + i // self.take) for i, e in enumerate(ids)])

    # --- planning -------------------------------------------------------------------------------
    def _set_plan(self, ahead: list[tuple[Key, int]]) -> None:
        """ahead: (key, layers until its use), nearest first; a key planned twice keeps its nearest use."""
        dist: dict[Key, int] = {}
        for key, d in ahead:
            dist.setdefault(key, d)
        plan = list(dist)
        self.cancelled += sum(1 for key in self.pending if key not in dist)
        self.pending = plan
        self.protect = set(plan)
        self.value = plan_values(plan, dist, self.top_k)
        reprioritize = getattr(self.cache.engine, "reprioritize", None)
        for key, handle in list(self.cache.inflight.items()):
            if not handle.prefetch:
                continue
            if key not in self.protect:
                if self.cache.cancel_prefetch(key):
                    self.cancelled_inflight += 1
            elif reprioritize is not None:  # nearer now: its value under the new plan
                reprioritize(handle, self.value[key])
        if isinstance(self.cache.policy, Predictive):
            self.cache.policy.set_next_use(dist)
        self.pump()

    def pump(self) -> None:
        """Issue pending loads, nearest first, while the in-flight window has room."""
        cache = self.cache
        while self.pending and cache.inflight_count() < self.max_inflight:
            key = self.pending.pop(0)
            if cache.slot_of[key] >= 0:
                continue
            if not cache.prefetch(key, self.protect | cache.pinned, priority=self.value.get(key, 0.0)):
                self.pending.clear()  # nothing evictable for this one: later (lower-priority) ones neither
                return
            self.issued += 1


def plan_values(plan: Sequence[Key], dist: dict[Key, int], top_k: int) -> dict[Key, float]:
    """Expected value of each planned load: P(use) / (layers until use). The plan lists each layer's
    experts by falling score; P(use) is 1 for the first top_k of a layer, halving per rank beyond."""
    rank: dict[int, int] = {}
    out: dict[Key, float] = {}
    for key in plan:
        d = dist[key]
        r = rank.get(d, 0)
        rank[d] = r + 1
        p_use = 1.0 if r < top_k else 0.5 ** (r - top_k + 1)
        out[key] = p_use / max(1, d)
    return out
