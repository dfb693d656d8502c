"""The sparse MoE block: the router function (families.Routing) and the expert boundary.

The expert computation is one function boundary, `ExpertBackend.__call__(layer, h, ids, weights)`,
that the offloading engine (moe_offload.offload) and the resident experts below both implement.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from ..families import Routing
from ..kernels import BiasedFloatPool, ClampedSwiGLU, one_token_experts, run_experts


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] -> (weights [N, k] float32; ids [N, k] int64): softmax, top-k, the k
    probabilities renormalised to sum to 1 when `normalize`. A model routes with its family's router
    function (`MoeModel.route`); this is the softmax one, for code that holds no model."""
    return Routing(top_k=top_k, renormalize=normalize)(router_logits)


def expert_activation(cfg) -> ClampedSwiGLU | None:
    """The routed experts' activation for a config.ModelConfig: None for SwiGLU, or the clamped SwiGLU
    (cfg.swiglu_limit, cfg.swiglu_alpha; GPT-OSS)."""
    return None if cfg.swiglu_limit is None else ClampedSwiGLU(cfg.swiglu_limit, cfg.swiglu_alpha)


class ExpertBackend(Protocol):
    """Runs layer `layer`'s experts: h [N, H], ids [N, k], weights [N, k] float32 -> [N, H] (h's dtype)."""

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor: ...


class ResidentExperts(nn.Module):
    """Every expert of every layer held on one device: w13 [L, E, 2I, H], w2 [L, E, H, I].

    Each layer's experts are a slot pool with the identity slot table, run by `backend`
    ("loop", "grouped_mm" or "triton"; see moe_offload.kernels.dispatch).
    Experts with biases (b13 [L, E, 2I], b2 [L, E, H]) or an activation of their own (`act`, see
    expert_activation) run as a kernels.BiasedFloatPool per layer: on the loop backend only.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, backend: str = "loop", b13: torch.Tensor | None = None,
                 b2: torch.Tensor | None = None, act: ClampedSwiGLU | None = None):
        super().__init__()
        self.w13 = nn.Parameter(w13, requires_grad=w13.requires_grad)
        self.w2 = nn.Parameter(w2, requires_grad=w2.requires_grad)
        self.b13 = None if b13 is None else nn.Parameter(b13, requires_grad=b13.requires_grad)
        self.b2 = None if b2 is None else nn.Parameter(b2, requires_grad=b2.requires_grad)
        self.act = act
        if (b13 is not None or act is not None) and backend != "loop":
            raise ValueError(f"experts with biases and their own activation (GPT-OSS) run on the loop backend only, "
                             f"not {backend!r}: pass moe_backend='loop'")
        self.backend = backend
        self.register_buffer("identity_slots", torch.arange(w13.shape[1], dtype=torch.int32, device=w13.device),
                             persistent=False)

    def one_token_experts(self, layer: int, h: torch.Tensor) -> tuple[bool, list] | None:
        """Layer `layer`'s experts as a compiled decode step runs them for one token h [1, H]
        (kernels.one_token_experts), or None."""
        if self.b13 is not None or self.act is not None or self.backend != "loop":
            return None
        return one_token_experts(h, self.w13[layer], self.w2[layer], self.w13.shape[1])

    def forward(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        if self.b13 is not None or self.act is not None:
            pool = BiasedFloatPool(self.w13.shape[-1], self.w2.shape[-1], self.w13[layer], self.w2[layer],
                                   b13=None if self.b13 is None else self.b13[layer],
                                   b2=None if self.b2 is None else self.b2[layer], act=self.act)
            return run_experts(self.backend, h, ids, weights, pool, None, self.identity_slots)
        return run_experts(self.backend, h, ids, weights, self.w13[layer], self.w2[layer], self.identity_slots)
