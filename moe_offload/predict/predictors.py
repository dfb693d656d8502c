"""Predictors of future routing: at layer l, from the residual x entering layer l's MoE, scores over
experts for layers l+1 .. l+D.

    none       nothing (no prefetch)
    next-gate  layer l+d's router applied to today's residual (the mixtral-offloading heuristic), in
               one of two forms: "residual" = gate_{l+d}(norm_{l+d}(x)), "normed" = gate_{l+d}(norm_l(x))
    m2r2       an accelerated residual r = x + B·silu(A·rms(x)) per (l, d), then layer l+d's norm and
               router on r (see accelerator.py); B starts at zero, so untrained m2r2 == next-gate
    oracle     the true future routing from a recorded trace (an upper bound)
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..model.layers import rms_norm
from ..model.transformer import MixtralTransformer


class Predictor(Protocol):
    name: str
    lookahead: int

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] at layer `layer` -> [N, D, E] router probabilities for layers layer+1..layer+D
        (rows past the last layer are NaN)."""


def router_probs(model: MixtralTransformer, layer: int, h: torch.Tensor) -> torch.Tensor:
    """softmax of layer's router on already-normed h [N, H] -> [N, E] float32."""
    return torch.softmax(F.linear(h, model.layers[layer].gate).float(), dim=-1)


# The next-gate form the runtime uses: "residual" = gate_{l+d}(norm_{l+d}(x)) beat "normed" =
# gate_{l+d}(norm_l(x)) by 0.001-0.003 held-out recall on the bundled model (`train-accelerator` report).
NEXT_GATE_VARIANT = "residual"


class NextGate:
    """Layer l+d's router on today's residual: variant "residual" (l+d's norm) or "normed" (l's norm)."""

    name = "next-gate"

    def __init__(self, model: MixtralTransformer, lookahead: int, variant: str = NEXT_GATE_VARIANT):
        if variant not in ("residual", "normed"):
            raise ValueError(f"next-gate variant must be 'residual' or 'normed', got {variant!r}")
        self.model, self.lookahead, self.variant = model, lookahead, variant

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        m, L, E = self.model, self.model.cfg.num_hidden_layers, self.model.cfg.num_local_experts
        eps = m.cfg.rms_norm_eps
        out = torch.full((x.shape[0], self.lookahead, E), float("nan"), device=x.device)  # [N, D, E]
        normed = rms_norm(x, m.layers[layer].post_attention_layernorm, eps)
        for d in range(1, self.lookahead + 1):
            t = layer + d
            if t >= L:
                break
            h = rms_norm(x, m.layers[t].post_attention_layernorm, eps) if self.variant == "residual" else normed
            out[:, d - 1] = router_probs(m, t, h)
        return out


class OraclePredictor:
    """True future routing from a trace (an upper bound): the routed weights of layers l+1..l+D for
    the token at trace index `position` (the prefetcher sets it from the running forward's position)."""

    name = "oracle"

    def __init__(self, routed_ids, routed_weights, num_experts: int, lookahead: int):
        self.ids, self.weights = routed_ids, routed_weights  # [T, L, k]
        self.num_experts, self.lookahead = num_experts, lookahead
        self.position = 0

    def _row(self, t: int, layer: int) -> torch.Tensor:
        row = torch.zeros(self.num_experts)
        if t < self.ids.shape[0]:
            row[torch.as_tensor(self.ids[t, layer].astype("int64"))] = torch.as_tensor(self.weights[t, layer]) + 1.0
        return row

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        L = self.ids.shape[1]
        out = torch.full((x.shape[0], self.lookahead, self.num_experts), float("nan"))
        for d in range(1, self.lookahead + 1):
            if layer + d < L:
                for n in range(x.shape[0]):
                    out[n, d - 1] = self._row(self.position + n, layer + d)
        return out

    def embedding_scores(self) -> torch.Tensor:
        """[D, E] for layers 0..D-1 of the token at `position`."""
        return torch.stack([self._row(self.position, t) for t in range(min(self.lookahead, self.ids.shape[1]))])
