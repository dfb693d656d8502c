"""The sparse MoE block: softmax router, top-k with renormalised weights, and expert backends.

The expert computation is one function boundary, `ExpertBackend.__call__(layer, h, ids, weights)`,
that the offloading engine and the Triton kernels plug into.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] -> (weights [N, k] float32, renormalised; ids [N, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [N, k]
    return weights / weights.sum(dim=-1, keepdim=True), ids


class ExpertBackend(Protocol):
    """Runs layer `layer`'s experts: h [N, H], ids [N, k], weights [N, k] float32 -> [N, H] (h's dtype)."""

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor: ...


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert. x [n, H], w13 [2I, H] (w1 rows then w3 rows), w2 [H, I] -> [n, H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, w2)


def moe_loop(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, slot_of_expert: list[int] | None = None, *,
             experts: set[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert loop: for each routed expert e, gather its tokens, run it, scatter-add weighted.

    h [N, H]; ids, weights [N, k]; w13 [S, 2I, H]; w2 [S, H, I]; expert e lives in slot
    slot_of_expert[e] (identity when None). Experts are summed in ascending id, like the reference.
    `experts` restricts the loop to those experts, accumulating into `out`: running groups of
    ascending experts one after another gives bit-identical results to one full call.
    One host sync (the per-expert token counts) is inherent to a Python loop over experts.
    """
    n, k = ids.shape
    if out is None:
        out = torch.zeros_like(h)
    flat = ids.reshape(-1)  # [N*k]
    order = torch.argsort(flat, stable=True)  # [N*k], grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0] if slot_of_expert is None else len(slot_of_expert))
    flat_w = weights.reshape(-1)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        sel = order[start:start + c]  # [c] positions in the flat [N*k] assignment list
        start += c
        if experts is not None and e not in experts:
            continue
        tok = sel // k  # [c]
        slot = e if slot_of_expert is None else slot_of_expert[e]
        y = expert_ffn(h[tok], w13[slot], w2[slot])  # [c, H]
        out.index_add_(0, tok, (y * flat_w[sel, None]).to(h.dtype))
    return out


class ResidentExperts(nn.Module):
    """Every expert of every layer held on one device: w13 [L, E, 2I, H], w2 [L, E, H, I].

    Each layer's experts are a slot pool with the identity slot table, run by `backend`
    ("loop", "grouped_mm" or "triton"; see model/backends.py).
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, backend: str = "loop"):
        super().__init__()
        self.w13 = nn.Parameter(w13, requires_grad=w13.requires_grad)
        self.w2 = nn.Parameter(w2, requires_grad=w2.requires_grad)
        self.backend = backend
        self.register_buffer("identity_slots", torch.arange(w13.shape[1], dtype=torch.int32, device=w13.device),
                             persistent=False)

    def forward(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        from .backends import run_experts

        return run_experts(self.backend, h, ids, weights, self.w13[layer], self.w2[layer], self.identity_slots)
