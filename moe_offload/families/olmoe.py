"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over the whole projections, optional clip_qkv, softmax
top-k renormalised when norm_topk_prob, the experts' width under intermediate_size."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Family
from .registry import register


class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    width_key = "intermediate_size"
    defaults = dict(rms_norm_eps=1e-5, rope_theta=1e4, bos_token_id=None, eos_token_id=50279, norm_topk_prob=False)
    qk_norm = "full"

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().fields(raw), "clip_qkv": raw.get("clip_qkv")}

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        return {**super().hf_dict(cfg), "clip_qkv": cfg.clip_qkv}


OLMOE = register(Olmoe())
