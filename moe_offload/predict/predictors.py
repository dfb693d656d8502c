"""Predictors of future routing (offload.protocols.Predictor): at layer l, from the residual x
entering layer l's MoE, scores over experts for layers l+1 .. l+D; and, before a token's forward
pass, its first layers' experts from the token id alone.

    none       nothing (no prefetch)
    next-gate  layer l+d's router applied to today's residual (the mixtral-offloading heuristic), in
               one of two forms: "residual" = gate_{l+d}(norm_{l+d}(x)), "normed" = gate_{l+d}(norm_l(x))
    m2r2       an accelerated residual r = x + B·silu(A·rms(x)) per (l, d), then layer l+d's norm and
               router on r, ranked as that router chooses (see accelerator.py); B starts at zero, so
               untrained m2r2 == next-gate
    oracle     the true future routing from a recorded trace (an upper bound)
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.layers import rms_norm
from ..model.transformer import MoeModel


def router_probs(model: MoeModel, layer: int, h: torch.Tensor) -> torch.Tensor:
    """MoE layer's router scores on already-normed h [N, H] -> [N, E] float32, ranked as the family's
    router chooses (MoeModel.router_scores): the softmax (Mixtral, Qwen, OLMoE; bit for bit the former
    softmax), or the sigmoid plus the correction bias with the experts outside the best groups at -inf
    (GLM-4.5, DeepSeek-V3), so that its top-k is the routed set."""
    return model.router_scores(layer, model.router_logits(layer, h))


@torch.no_grad()
def embedding_router_probs(model: MoeModel, x: torch.Tensor, layers: int) -> torch.Tensor:
    """Next-gate on token embeddings x [N, H]: [N, layers, E] for layers 0..layers-1."""
    eps = model.cfg.rms_norm_eps
    return torch.stack([router_probs(model, t, rms_norm(x, model.moe_layers[t].post_attention_layernorm, eps))
                        for t in range(layers)], dim=1)


class FirstLayerTable:
    """Top experts of a token's first D layers, from its embedding alone (next-gate on the embedding),
    precomputed for the whole vocabulary: [V, D, take] on the host. A token's first layers are then
    planned before its forward pass with no device work (recall 0.95 at layer 0 on the bundled model)."""

    CHUNK = 4096

    def __init__(self, model: MoeModel, lookahead: int):
        self.model, self.layers = model, min(lookahead, model.cfg.num_moe_layers)
        self._tables: dict[int, np.ndarray] = {}

    def top(self, token_id: int, take: int) -> np.ndarray:
        table = self._tables.get(take)
        if table is None:
            table = self._tables[take] = self._build(take)
        return table[token_id]

    @torch.no_grad()
    def _build(self, take: int) -> np.ndarray:
        emb = self.model.embed_tokens
        parts = []
        for v0 in range(0, emb.shape[0], self.CHUNK):
            probs = embedding_router_probs(self.model, emb[v0:v0 + self.CHUNK], self.layers)  # [c, D, E]
            parts.append(torch.topk(probs, take, dim=-1).indices.to(torch.int32).cpu().numpy())
        return np.concatenate(parts)  # [V, D, take]


# The next-gate form the runtime uses: "residual" = gate_{l+d}(norm_{l+d}(x)) beat "normed" =
# gate_{l+d}(norm_l(x)) by 0.001-0.003 held-out recall on the bundled model (`train-accelerator` report).
NEXT_GATE_VARIANT = "residual"


class NextGate:
    """Layer l+d's router on today's residual: variant "residual" (l+d's norm) or "normed" (l's norm)."""

    name = "next-gate"
    cross_token = False

    def __init__(self, model: MoeModel, lookahead: int, variant: str = NEXT_GATE_VARIANT):
        if variant not in ("residual", "normed"):
            raise ValueError(f"next-gate variant must be 'residual' or 'normed', got {variant!r}")
        self.model, self.lookahead, self.variant = model, lookahead, variant
        self.first = FirstLayerTable(model, lookahead)

    def scores(self, layer: int, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        m, L, E = self.model, self.model.cfg.num_moe_layers, self.model.cfg.num_local_experts
        eps = m.cfg.rms_norm_eps
        out = torch.full((x.shape[0], self.lookahead, E), float("nan"), device=x.device)  # [N, D, E]
        normed = rms_norm(x, m.moe_layers[layer].post_attention_layernorm, eps)
        for d in range(1, self.lookahead + 1):
            t = layer + d
            if t >= L:
                break
            h = rms_norm(x, m.moe_layers[t].post_attention_layernorm, eps) if self.variant == "residual" else normed
            out[:, d - 1] = router_probs(m, t, h)
        return out

    def observe(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        pass  # reads today's residual only

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        return self.first.top(token_id, take)
