"""GLM-4.5 / 4.6 / 4.5-Air (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases
(attention_bias), per-head q/k RMSNorm when use_qk_norm, partial rotary (partial_rotary_factor: the
leading half of each head rotates); dense first layers (first_k_dense_replace, MLP width
intermediate_size); then a sigmoid router with the e_score_correction_bias that moves the choice only,
group-limited top-k (n_group / topk_group), renormalised when norm_topk_prob and scaled by
routed_scaling_factor, plus an ungated shared expert (n_shared_experts x moe_intermediate_size).

The multi-token-prediction layer(s) shipped after the last layer (num_nextn_predict_layers; tensors
model.layers.{L..}.*) are not run: decoding uses the main model only, and their tensors are ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .base import Family, is_mtp_layer
from .registry import register


def _rope_param(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    """A RoPE setting from the hub's top level or transformers 5's rope_parameters."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if key in raw:
        return raw[key]
    return params.get(key, default) if isinstance(params, dict) else default


class Glm4Moe(Family):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    experts_key = "n_routed_experts"
    defaults = dict(rms_norm_eps=1e-5, rope_theta=1e4, bos_token_id=None, eos_token_id=None, norm_topk_prob=True)
    shared_expert = "shared_experts"
    shared_expert_gate = None  # ungated: added as it is

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        if raw.get("use_sliding_window") or raw.get("sliding_window"):
            raise ConfigError(f"{source}: a sliding window is not supported for glm4_moe (the hub checkpoints "
                              "have none)")
        for key in ("moe_layer_freq",):
            if raw.get(key, 1) != 1:
                raise ConfigError(f"{source}: {key} {raw[key]!r} is not supported for glm4_moe; expected 1")

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        shared = raw.get("n_shared_experts", 1) or 0
        return {**super().fields(raw),
                "shared_expert_intermediate_size": shared * raw.get(self.width_key, 0),
                "qk_norm": "per_head" if raw.get("use_qk_norm") else "none",
                "qkv_bias": bool(raw.get("attention_bias", False)),
                "first_k_dense_replace": raw.get("first_k_dense_replace", 1),
                "dense_intermediate_size": raw.get("intermediate_size", 10944),
                "partial_rotary_factor": float(_rope_param(raw, "partial_rotary_factor", 0.5)),
                "scoring": "sigmoid", "correction_bias": True,
                "n_group": raw.get("n_group", 1) or 1, "topk_group": raw.get("topk_group", 1) or 1,
                "routed_scaling_factor": float(raw.get("routed_scaling_factor", 1.0)),
                "mtp_layers": raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0}

    def ignores(self, cfg: Any, name: str) -> bool:
        return is_mtp_layer(cfg, name)

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        out = super().hf_dict(cfg)
        si, width = cfg.shared_expert_intermediate_size, cfg.intermediate_size
        out.update(intermediate_size=cfg.dense_intermediate_size, n_shared_experts=si // width if si else 0,
                   first_k_dense_replace=cfg.first_k_dense_replace, attention_bias=cfg.qkv_bias,
                   use_qk_norm=cfg.qk_norm == "per_head", partial_rotary_factor=cfg.partial_rotary_factor,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   num_nextn_predict_layers=cfg.mtp_layers)
        return out


GLM4_MOE = register(Glm4Moe())
