"""DeepSeek-V3 / R1 and Kimi-K2 (DeepseekV3ForCausalLM): multi-head latent attention (model/mla.py:
q-LoRA q_lora_rank or a plain q_proj, the compressed KV kv_lora_rank + the shared rope key
qk_rope_head_dim, whose dims pair up interleaved when rope_interleave, transformers' default), yarn RoPE
with its attention-scale correction, dense first layers (first_k_dense_replace), one ungated shared
expert, a sigmoid router with e_score_correction_bias over n_group groups (the best topk_group kept),
renormalised and scaled by routed_scaling_factor.

The multi-token-prediction layer shipped after the last layer (num_nextn_predict_layers; tensors
model.layers.{L}.*) is not run nor counted: its tensors are ignored.

The checkpoints as published (quantization_config quant_method "fp8", weight_block_size [128, 128]) store
every linear weight float8_e4m3fn with a `weight_scale_inv` per block, except the embeddings, norms, router
gate, its correction bias and lm_head (and what modules_to_not_convert names: those are stored in bf16).
They load as stored: the routed experts stay FP8 (the 'fp8:128x128' hub format, formats/fp8.py: host store
bytes are the file's expert bytes); the other FP8 linears (attention, the dense layers' MLPs, the shared
experts) are dequantized into the compute dtype as they load, one tensor at a time (Checkpoint.tensor),
which `info` says.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from ..errors import ConfigError
from .base import Family, is_mtp_layer, rope_type
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
    shipped_loads = True  # the FP8 quantization_config is read as the hub format (config.py): experts stay FP8
    # the rope dims rotate in the compute dtype with tables cast to it (V3); DeepSeek-V2 rotates in float32
    rope_float32: ClassVar[bool] = False

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        if raw.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"{source}: moe_layer_freq {raw['moe_layer_freq']!r} is not supported; expected 1")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for {self.model_type} (the hub "
                              "checkpoints have none); expected false")

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        qc = raw.get("quantization_config") or {}
        if qc.get("quant_method") == "fp8" and list(qc.get("weight_block_size") or []) == [128, 128]:
            return "fp8_block128"
        return None

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        width = raw.get(self.width_key, 0)
        method = raw.get("topk_method", "noaux_tc")
        return {**super().fields(raw), **mla_fields(raw),
                "shared_expert_intermediate_size": (raw.get("n_shared_experts") or 0) * width,
                "first_k_dense_replace": raw.get("first_k_dense_replace", 0),
                "dense_intermediate_size": raw.get("intermediate_size", 0),
                "scoring": raw.get("scoring_func", "sigmoid"), "correction_bias": method == "noaux_tc",
                "n_group": raw.get("n_group", 1) or 1, "topk_group": raw.get("topk_group", 1) or 1,
                "routed_scaling_factor": float(raw.get("routed_scaling_factor", 1.0)),
                "rope_interleave": bool(raw.get("rope_interleave", True)),
                "mtp_layers": raw.get("num_nextn_predict_layers", 0) or 0}

    def ignores(self, cfg: Any, name: str) -> bool:
        return is_mtp_layer(cfg, name)

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        out = super().hf_dict(cfg)
        si, width = cfg.shared_expert_intermediate_size, cfg.intermediate_size
        out.update(mla_hf_fields(cfg), intermediate_size=cfg.dense_intermediate_size,
                   n_shared_experts=si // width if si else 0, first_k_dense_replace=cfg.first_k_dense_replace,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=cfg.mtp_layers,
                   scoring_func=cfg.scoring, topk_method="noaux_tc" if cfg.correction_bias else "greedy")
        if (cfg.expert_format or "").startswith("fp8:"):  # the published FP8 checkpoints' quantization_config
            block = [int(b) for b in cfg.expert_format.removeprefix("fp8:").split(",")[0].split("x")]  # 'fp8:128x128'
            out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": block}
        return out

    def layer_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The base layout with the attention's tensors in MLA's names (see mla_tensors)."""
        out = super().layer_tensors(cfg, layer)
        for slot in ("q_proj", "k_proj", "v_proj", "o_proj"):
            del out[slot]
        out.update(mla_tensors(cfg, self.layer_prefix(layer) + "self_attn."))
        return out


def mla_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig's multi-head latent attention fields from a DeepSeek config.json."""
    return {"attention": "mla", "q_lora_rank": raw.get("q_lora_rank") or 0,
            "kv_lora_rank": raw["kv_lora_rank"], "qk_nope_head_dim": raw["qk_nope_head_dim"],
            "qk_rope_head_dim": raw["qk_rope_head_dim"], "v_head_dim": raw["v_head_dim"],
            "head_dim": raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"], "qkv_bias": False,
            "rope_type": rope_type(raw)}


def mla_hf_fields(cfg: Any) -> dict[str, Any]:
    """The config.json keys of a DeepSeek model's latent attention and RoPE (inverse of mla_fields)."""
    out = {"q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
           "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
           "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim}
    if cfg.rope_type == "yarn":
        scaling = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_position,
                   "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow, "truncate": cfg.rope_truncate}
        for key, value in (("mscale", cfg.rope_mscale), ("mscale_all_dim", cfg.rope_mscale_all_dim),
                           ("attention_factor", cfg.rope_attention_factor)):
            if value:
                scaling[key] = value
        out["rope_scaling"] = scaling
    return out


def mla_tensors(cfg: Any, a: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """One layer's latent attention tensors under its "model.layers.N.self_attn." prefix `a`: slot ->
    (checkpoint name, shape). The query: q_a_proj [q_lora, H], q_a_layernorm [q_lora], q_b_proj
    [nh (dn + dr), q_lora] with q-LoRA, else q_proj [nh (dn + dr), H]; the KV: kv_a_proj_with_mqa
    [r + dr, H] (the latent and the rope key), kv_a_layernorm [r], kv_b_proj [nh (dn + dv), r] (each head's
    key then value up-projection); o_proj [H, nh dv]."""
    h, nh, ql, r = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qk = nh * (dn + dr)
    if ql:
        out = {"q_a_proj": (a + "q_a_proj.weight", (ql, h)), "q_a_layernorm": (a + "q_a_layernorm.weight", (ql,)),
               "q_b_proj": (a + "q_b_proj.weight", (qk, ql))}
    else:
        out = {"q_proj": (a + "q_proj.weight", (qk, h))}
    out.update(kv_a_proj_with_mqa=(a + "kv_a_proj_with_mqa.weight", (r + dr, h)),
               kv_a_layernorm=(a + "kv_a_layernorm.weight", (r,)),
               kv_b_proj=(a + "kv_b_proj.weight", (nh * (dn + dv), r)), o_proj=(a + "o_proj.weight", (h, nh * dv)))
    return out


class KimiK2(DeepseekV3):
    """Kimi-K2 ships DeepSeek-V3's architecture under its own model_type."""

    model_type = "kimi_k2"


DEEPSEEK_V3 = register(DeepseekV3())
KIMI_K2 = register(KimiK2())
