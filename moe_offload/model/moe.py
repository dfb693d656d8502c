"""The sparse MoE block: the router function (families.Routing) and the expert boundary.

The expert computation is one function boundary, `ExpertBackend.__call__(layer, h, ids, weights)`,
that the offloading engine (moe_offload.offload) and the resident experts below both implement.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from ..families import Routing
from ..kernels import run_experts


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] -> (weights [N, k] float32; ids [N, k] int64): softmax, top-k, the k
    probabilities renormalised to sum to 1 when `normalize`. A model routes with its family's router
    function (`MoeModel.route`); this is the softmax one, for code that holds no model."""
    return Routing(top_k=top_k, renormalize=normalize)(router_logits)


class ExpertBackend(Protocol):
    """Runs layer `layer`'s experts: h [N, H], ids [N, k], weights [N, k] float32 -> [N, H] (h's dtype)."""

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor: ...


class ResidentExperts(nn.Module):
    """Every expert of every layer held on one device: w13 [L, E, 2I, H], w2 [L, E, H, I].

    Each layer's experts are a slot pool with the identity slot table, run by `backend`
    ("loop", "grouped_mm" or "triton"; see moe_offload.kernels.dispatch).
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
        return run_experts(self.backend, h, ids, weights, self.w13[layer], self.w2[layer], self.identity_slots)
