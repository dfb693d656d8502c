"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): q/k/v biases, a shared expert in every layer with
a sigmoid gate (resident on the device), softmax top-k renormalised when norm_topk_prob."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .base import Family
from .registry import register


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    required_keys = ("shared_expert_intermediate_size",)

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        super().check(raw, source)
        if not raw.get("shared_expert_intermediate_size"):
            raise ConfigError(f"{source}: shared_expert_intermediate_size must be a positive integer for "
                              f"{self.model_type}, got {raw.get('shared_expert_intermediate_size')!r}")

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().fields(raw), "shared_expert_intermediate_size": raw.get("shared_expert_intermediate_size", 0),
                "qkv_bias": bool(raw.get("qkv_bias", True))}

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        out = {**super().hf_dict(cfg), "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
        out.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=cfg.qkv_bias,
                   intermediate_size=cfg.shared_expert_intermediate_size)
        return out


QWEN2_MOE = register(Qwen2Moe())
