"""GPT-OSS-20B / 120B (GptOssForCausalLM): grouped-query attention with q/k/v/o biases and a learned sink
logit per head (a softmax over the keys and the sink, the sink's share dropped), sliding-window and full
layers as layer_types lists them (alternating in the published configs, window 128), yarn RoPE (not
truncated) rotating the two halves of each head; a router with a bias whose top-k logits are softmaxed;
experts with biases and the clamped SwiGLU (swiglu_limit, swiglu_alpha), run on the loop backend.

The checkpoint fuses each layer's experts: mlp.experts.gate_up_proj [E, H, 2I] with gate and up
interleaved along the last dim (gate = [..., ::2], up = [..., 1::2]), gate_up_proj_bias [E, 2I] (the same
interleave), down_proj [E, I, H], down_proj_bias [E, H] (x @ W + b, as transformers' module and
save_pretrained keep them). read_expert reads one expert's rows and turns them into the core's layout.

The checkpoints as published store the experts in MXFP4 (quantization_config quant_method "mxfp4";
formats/mxfp4.py): gate_up_proj_blocks [E, 2I, H/32, 16] and _scales [E, 2I, H/32] (rows interleaved
gate, up), down_proj_blocks [E, H, I/32, 16] and _scales [E, H, I/32], with the bias tensors above
(bfloat16 on the hub). Such a config sets expert_format 'mxfp4'; packed_expert_tensors names the tensors
of one layer by row section, and read_packed_expert reads one expert's slice of each, as stored, into
the expert's row (the host store holds the file's bytes; the loop backend dequantizes).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ConfigError
from .base import Family, rope_type
from .registry import register

# transformers' defaults where config.json leaves the key out
SLIDING_WINDOW, SWIGLU_LIMIT, SWIGLU_ALPHA = 128, 7.0, 1.702
MXFP4, MXFP4_BLOCK = "mxfp4", 32  # the published experts' format; inputs per scale


class GptOss(Family):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    experts_key, width_key = "num_local_experts", "intermediate_size"
    defaults = dict(rms_norm_eps=1e-5, rope_theta=150000.0, bos_token_id=None, eos_token_id=200002,
                    norm_topk_prob=True)
    rope_types = ("default", "yarn")
    router = "router"
    norms_float32 = True

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        if not (raw.get("rope_parameters") or raw.get("rope_scaling")):
            raise ConfigError(f"{source}: gpt_oss needs its rope_scaling (the published yarn one); config.json has "
                              "none")
        if self.shipped_format(raw) == MXFP4:
            bad = [k for k in ("hidden_size", "intermediate_size") if int(raw.get(k) or 0) % MXFP4_BLOCK]
            if bad:
                raise ConfigError(f"{source}: mxfp4 experts need {' and '.join(bad)} divisible by {MXFP4_BLOCK} (one "
                                  f"scale per {MXFP4_BLOCK} inputs), got {', '.join(str(raw[k]) for k in bad)}")

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        qc = raw.get("quantization_config") or {}
        return MXFP4 if isinstance(qc, Mapping) and qc.get("quant_method") == MXFP4 else None

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        n = raw.get("num_hidden_layers", 0)
        types = raw.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        bias = bool(raw.get("attention_bias", True))
        window = raw.get("sliding_window", SLIDING_WINDOW)
        return {**super().fields(raw), "qkv_bias": bias, "o_bias": bias, "attention_sinks": True,
                "expert_bias": True, "router_logit_bias": True, "scoring": "topk_softmax", "norm_topk_prob": True,
                "sliding_window": window, "layer_types": tuple(types),
                "sliding_window_layers": sum(t == "sliding_attention" for t in types) if window else 0,
                "swiglu_limit": float(raw.get("swiglu_limit", SWIGLU_LIMIT)),
                "swiglu_alpha": float(raw.get("swiglu_alpha", SWIGLU_ALPHA)), "rope_type": rope_type(raw),
                **({"expert_format": MXFP4} if self.shipped_format(raw) == MXFP4 else {})}  # loaded as stored

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        out = super().hf_dict(cfg)
        del out["norm_topk_prob"]
        out.update(attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
                   swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
        if cfg.rope_type == "yarn":
            scaling = {"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.rope_beta_fast,
                       "beta_slow": cfg.rope_beta_slow, "truncate": cfg.rope_truncate,
                       "original_max_position_embeddings": cfg.rope_original_max_position}
            if cfg.rope_attention_factor is not None:
                scaling["attention_factor"] = cfg.rope_attention_factor
            out["rope_scaling"] = scaling
        else:
            out["rope_scaling"] = {"rope_type": "default"}
        if cfg.expert_format == MXFP4:
            out["quantization_config"] = {"quant_method": MXFP4, "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        return out

    # --- the fused experts ------------------------------------------------------------------------------
    def _experts(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.experts."

    def expert_name(self, layer: int, expert: int, w: str) -> str:
        """The fused tensor holding weight w of every expert of `layer` (w1 and w3: gate_up_proj)."""
        return self._experts(layer) + ("down_proj" if w == "w2" else "gate_up_proj")

    def expert_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[int, ...]]:
        if cfg.expert_format is not None:  # MXFP4 as published
            return {name: shape for name, shape, _ in self.packed_expert_tensors(cfg, layer).values()}
        e, h, i, p = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, self._experts(layer)
        return {p + "gate_up_proj": (e, h, 2 * i), p + "gate_up_proj_bias": (e, 2 * i),
                p + "down_proj": (e, i, h), p + "down_proj_bias": (e, h)}

    def packed_expert_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[str, tuple[int, ...], Any]]:
        """The tensors holding `layer`'s packed experts (cfg.expert_format, MXFP4), by the row section each
        expert's slice fills: section -> (name, shape [E, ...], torch dtype; None for the float biases)."""
        e, h, i, p = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, self._experts(layer)
        out = {}
        for w, proj, (n, k) in (("w13", "gate_up_proj", (2 * i, h)), ("w2", "down_proj", (h, i))):
            # the hub's MXFP4 layout (what formats/mxfp4.py's matrix_specs reads): blocks of 32 weights,
            # 16 bytes of nibbles and one e8m0 scale byte each
            out[f"{w}.blocks"] = (f"{p}{proj}_blocks", (e, n, k // MXFP4_BLOCK, 16), torch.uint8)
            out[f"{w}.scales"] = (f"{p}{proj}_scales", (e, n, k // MXFP4_BLOCK), torch.uint8)
        out["b13"] = (p + "gate_up_proj_bias", (e, 2 * i), None)  # gate and up interleaved, like the rows
        out["b2"] = (p + "down_proj_bias", (e, h), None)
        return out

    def read_packed_expert(self, ckpt: Any, cfg: Any, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of `layer` as stored: its slice of each packed tensor and bias, by row section."""
        return {sec: ckpt.tensor_row(name, e) for sec, (name, _, _) in self.packed_expert_tensors(cfg, layer).items()}

    def read_expert(self, ckpt: Any, cfg: Any, layer: int, e: int):
        p = self._experts(layer)
        gate_up = ckpt.tensor_row(p + "gate_up_proj", e)  # [H, 2I], gate and up interleaved
        gate_up_bias = ckpt.tensor_row(p + "gate_up_proj_bias", e)  # [2I]
        w2 = ckpt.tensor_row(p + "down_proj", e).t()  # [I, H] -> [H, I]
        b13 = torch.cat((gate_up_bias[0::2], gate_up_bias[1::2]))  # [2I]: w1's bias, then w3's
        return gate_up[:, 0::2].t(), gate_up[:, 1::2].t(), w2, (b13, ckpt.tensor_row(p + "down_proj_bias", e))


GPT_OSS = register(GptOss())
