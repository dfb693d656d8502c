"""Qwen3-MoE (Qwen3MoeForCausalLM): per-head q/k RMSNorm, softmax top-k renormalised when
norm_topk_prob, every layer sparse, no sliding window."""

from __future__ import annotations

from typing import Any

from .base import Family
from .registry import register


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    qk_norm = "per_head"

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        return {**super().hf_dict(cfg), "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}


QWEN3_MOE = register(Qwen3Moe())
