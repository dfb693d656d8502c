"""DeepSeek-V2 and V2-Lite (DeepseekV2ForCausalLM): DeepSeek-V3's multi-head latent attention and
layout (families/deepseek_v3.py; q-LoRA where q_lora_rank is set, a plain q_proj where it is null as in
V2-Lite), its rope dims interleaved in pairs and rotated in float32, yarn RoPE; dense first layers, ungated
shared experts (n_shared_experts x moe_intermediate_size), and a softmax router: top-k over all experts
(topk_method "greedy") or within the topk_group best of n_group groups, a group scored by its best expert
("group_limited_greedy"), the weights scaled by routed_scaling_factor.

norm_topk_prob must be false (as every published V2 ships): DeepSeek's code then renormalises instead of
scaling while transformers' DeepseekV2 ignores the key, so a true value has no single meaning.

DeepSeek publishes V2 in bf16; FP8 block checkpoints of it in V3's layout (quantization_config quant_method
"fp8") load as V3's do: routed experts as stored, the other FP8 linears dequantized as they load.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .deepseek_v3 import DeepseekV3
from .registry import register
from .routing import Routing

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepseekV2(DeepseekV3):
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    defaults = dict(rms_norm_eps=1e-6, rope_theta=1e4, bos_token_id=1, eos_token_id=2, norm_topk_prob=False)
    rope_float32 = True

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        super().check(raw, source)
        method = raw.get("topk_method", "greedy")
        if method not in TOPK_METHODS:
            raise ConfigError(f"{source}: topk_method {method!r} is not one of {list(TOPK_METHODS)} for deepseek_v2")
        if raw.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"{source}: scoring_func {raw['scoring_func']!r} is not supported for deepseek_v2; "
                              "expected 'softmax'")
        if raw.get("norm_topk_prob"):
            raise ConfigError(f"{source}: norm_topk_prob=true is not supported for deepseek_v2 (DeepSeek's code and "
                              "transformers disagree on it; the published checkpoints have false)")
        if raw.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported for deepseek_v2 (the hub checkpoints "
                              "have none); expected false")

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        return None

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        grouped = raw.get("topk_method", "greedy") == "group_limited_greedy"
        return {**super().fields(raw), "scoring": "softmax", "correction_bias": False, "norm_topk_prob": False,
                "n_group": (raw.get("n_group") or 1) if grouped else 1,
                "topk_group": (raw.get("topk_group") or 1) if grouped else 1,
                "rope_interleave": True, "mtp_layers": 0}

    def routing(self, cfg: Any) -> Routing:
        """Softmax over the experts, top-k (within the best groups, each scored by its best expert), scaled."""
        return Routing(top_k=cfg.num_experts_per_tok, scoring="softmax", renormalize=False, n_group=cfg.n_group,
                       topk_group=cfg.topk_group, scale=cfg.routed_scaling_factor, group_score="max")

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        out = super().hf_dict(cfg)
        for key in ("rope_interleave", "num_nextn_predict_layers", "scoring_func"):
            del out[key]
        out.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy")
        return out


DEEPSEEK_V2 = register(DeepseekV2())
