"""Turn routing predictions into ordered loads on the copy engine, ahead of use.

At layer l (after l's own experts are pinned, before its compute), the predictor's scores for layers
l+1..l+D become a plan: for each of those layers its top-(k + margin) experts, nearest layer first,
then by score. The plan replaces the previous one (superseded loads that were not issued yet are
cancelled); at most `max_inflight` prefetches are in flight at once (default 1: copies share one FIFO
link, so every queued prefetch delays the next demand load by a whole expert copy; simulated on
Mixtral-8x7B over PCIe 4, wider windows and margins moved more bytes and lost tokens/s); the plan's
experts are protected from eviction by prefetches and feed the `predictive` policy's next-use distances.

Layers 0..D-1 of the next token are predicted from the embedding of the token just sampled (the
model calls the residual hook with layer -1 for the embedding): next-gate on the embedding, or the
oracle's trace.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.layers import rms_norm
from ..model.transformer import MixtralTransformer
from ..predict.predictors import router_probs
from .cache import ExpertCache
from .policy import Key, Predictive


class Prefetcher:
    def __init__(self, cache: ExpertCache, model: MixtralTransformer, predictor, margin: int = 0,
                 max_inflight: int = 1):
        self.cache, self.model, self.predictor = cache, model, predictor
        self.lookahead = predictor.lookahead
        self.k = model.cfg.num_experts_per_tok
        self.margin = margin
        if max_inflight < 1 or margin < 0:
            raise ValueError(f"prefetch window must be >= 1 and margin >= 0, got {max_inflight}, {margin}")
        self.max_inflight = max_inflight
        self.pending: list[Key] = []
        self.protect: set[Key] = set()
        self.cancelled = 0
        self.issued = 0
        self._x: torch.Tensor | None = None
        model.residual_hook = self.on_residual

    def on_residual(self, layer: int, x: torch.Tensor) -> None:
        """Model hook. The embedding (layer -1) is planned at once; a layer's residual is kept until
        that layer's own experts are pinned (after_acquire), so prefetches never evict them."""
        if hasattr(self.predictor, "position"):
            self.predictor.position = self.model.current_pos
        x = x.reshape(-1, x.shape[-1])
        if layer < 0:
            self.plan(-1, x)
        else:
            self._x = x

    def after_acquire(self, layer: int) -> None:
        if self._x is not None:
            self.plan(layer, self._x)
            self._x = None

    def plan(self, layer: int, x: torch.Tensor) -> None:
        """x [N, H]: the residual at `layer` (-1: the embedding of the next token). Decode only (N == 1)."""
        if x.shape[0] != 1:
            return
        L = self.model.cfg.num_hidden_layers
        if layer < 0:
            scores = self._embedding_scores(x)  # [D, E] for layers 0..D-1
            targets = list(range(min(self.lookahead, L)))
        else:
            scores = self.predictor.scores(layer, x)[0]  # [D, E] for layers layer+1..layer+D
            targets = [layer + d for d in range(1, self.lookahead + 1) if layer + d < L]
        take = min(self.k + self.margin, scores.shape[-1])
        plan: list[Key] = []
        for i, t in enumerate(targets):
            top = torch.topk(scores[i].float(), take).indices.tolist()
            plan.extend((t, e) for e in top)
        self.cancelled += sum(1 for key in self.pending if key not in plan)
        self.pending = plan
        self.protect = set(plan)
        if isinstance(self.cache.policy, Predictive):
            base = layer if layer >= 0 else -1
            self.cache.policy.set_next_use({key: key[0] - base for key in plan})
        self.pump()

    def pump(self) -> None:
        """Issue pending loads, nearest first, while the in-flight window has room."""
        cache = self.cache
        while self.pending and cache.inflight_count() < self.max_inflight:
            key = self.pending.pop(0)
            if cache.slot_of[key] >= 0:
                continue
            if not cache.prefetch(key, self.protect | cache.pinned):
                self.pending.clear()  # nothing evictable for this one: later (lower-priority) ones neither
                return
            self.issued += 1

    def _embedding_scores(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.predictor, "embedding_scores"):  # the oracle knows
            return self.predictor.embedding_scores()
        m = self.model
        rows = [router_probs(m, t, rms_norm(x, m.layers[t].post_attention_layernorm, m.cfg.rms_norm_eps))[0]
                for t in range(min(self.lookahead, m.cfg.num_hidden_layers))]
        return torch.stack(rows)
