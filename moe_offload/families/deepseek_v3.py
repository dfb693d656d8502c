"""DeepSeek-V3 / R1 and Kimi-K2 (DeepseekV3ForCausalLM), parsed for `info` and `simulate` only:
multi-head latent attention (q-LoRA q_lora_rank, compressed KV kv_lora_rank + the rope key
qk_rope_head_dim), dense first layers (first_k_dense_replace), one shared expert, a sigmoid router with
e_score_correction_bias over n_group groups (topk_group kept), renormalised and scaled by
routed_scaling_factor; FP8 block-128 weights as shipped; yarn RoPE. The MTP layer
(num_nextn_predict_layers) is not counted. load() refuses the model: MLA is not implemented yet."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .base import Family, rope_type
from .registry import register


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    experts_key = "n_routed_experts"
    required_keys = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    defaults = dict(rms_norm_eps=1e-6, rope_theta=1e4, bos_token_id=0, eos_token_id=1, norm_topk_prob=True)
    shared_expert = "shared_experts"
    shared_expert_gate = None
    rope_types = ("default", "yarn")

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        if raw.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"{source}: moe_layer_freq {raw['moe_layer_freq']!r} is not supported; expected 1")

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        qc = raw.get("quantization_config") or {}
        if qc.get("quant_method") == "fp8" and list(qc.get("weight_block_size") or []) == [128, 128]:
            return "fp8_block128"
        return None

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        width = raw.get(self.width_key, 0)
        method = raw.get("topk_method", "noaux_tc")
        return {**super().fields(raw),
                "attention": "mla", "q_lora_rank": raw.get("q_lora_rank") or 0,
                "kv_lora_rank": raw["kv_lora_rank"], "qk_nope_head_dim": raw["qk_nope_head_dim"],
                "qk_rope_head_dim": raw["qk_rope_head_dim"], "v_head_dim": raw["v_head_dim"],
                "head_dim": raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"],
                "qkv_bias": False,
                "shared_expert_intermediate_size": (raw.get("n_shared_experts") or 0) * width,
                "first_k_dense_replace": raw.get("first_k_dense_replace", 0),
                "dense_intermediate_size": raw.get("intermediate_size", 0),
                "scoring": raw.get("scoring_func", "sigmoid"), "correction_bias": method == "noaux_tc",
                "n_group": raw.get("n_group", 1) or 1, "topk_group": raw.get("topk_group", 1) or 1,
                "routed_scaling_factor": float(raw.get("routed_scaling_factor", 1.0)),
                "rope_type": rope_type(raw), "mtp_layers": raw.get("num_nextn_predict_layers", 0) or 0}

    def unsupported(self, cfg: Any) -> str | None:
        return (f"{self.model_type}: multi-head latent attention is not implemented yet (nor yarn RoPE); "
                "`info` and `simulate` work")


DEEPSEEK_V3 = register(DeepseekV3())
