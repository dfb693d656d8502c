"""GPT-OSS-20B / 120B (GptOssForCausalLM): grouped-query attention with q/k/v/o biases and a learned sink
logit per head (a softmax over the keys and the sink, the sink's share dropped), sliding-window and full
layers as layer_types lists them (alternating in the published configs, window 128), yarn RoPE (not
truncated) rotating the two halves of each head; a router with a bias whose top-k logits are softmaxed;
experts with biases and the clamped SwiGLU (swiglu_limit, swiglu_alpha), run on the loop backend.

The checkpoint fuses each layer's experts: mlp.experts.gate_up_proj [E, H, 2I] with gate and up
interleaved along the last dim (gate = [..., ::2], up = [..., 1::2]), gate_up_proj_bias [E, 2I] (the same
interleave), down_proj [E, I, H], down_proj_bias [E, H] (x @ W + b, as transformers' module and
save_pretrained keep them). read_expert reads one expert's rows and turns them into the core's layout.
The MXFP4 experts as published (*_blocks / *_scales) are sized by `info` and `simulate` but not loaded:
load() refuses them in one line (a bfloat16 checkpoint loads).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ConfigError
from .base import Family, rope_type
from .registry import register

# transformers' defaults where config.json leaves the key out
SLIDING_WINDOW, SWIGLU_LIMIT, SWIGLU_ALPHA = 128, 7.0, 1.702


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

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        qc = raw.get("quantization_config") or {}
        return "mxfp4" if qc.get("quant_method") == "mxfp4" else None

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
                "swiglu_alpha": float(raw.get("swiglu_alpha", SWIGLU_ALPHA)), "rope_type": rope_type(raw)}

    def unsupported(self, cfg: Any) -> str | None:
        if cfg.shipped_format and cfg.expert_format is None:
            return (f"{self.model_type}: the {cfg.shipped_format} experts as published are not loadable yet "
                    "(dequantize the checkpoint to bfloat16 first); `info` and `simulate` work")
        return None

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
        return out

    # --- the fused experts ------------------------------------------------------------------------------
    def _experts(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.experts."

    def expert_name(self, layer: int, expert: int, w: str) -> str:
        """The fused tensor holding weight w of every expert of `layer` (w1 and w3: gate_up_proj)."""
        return self._experts(layer) + ("down_proj" if w == "w2" else "gate_up_proj")

    def expert_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[int, ...]]:
        e, h, i, p = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, self._experts(layer)
        return {p + "gate_up_proj": (e, h, 2 * i), p + "gate_up_proj_bias": (e, 2 * i),
                p + "down_proj": (e, i, h), p + "down_proj_bias": (e, h)}

    def read_expert(self, ckpt: Any, cfg: Any, layer: int, e: int):
        p = self._experts(layer)
        gate_up = ckpt.tensor_row(p + "gate_up_proj", e)  # [H, 2I], gate and up interleaved
        gate_up_bias = ckpt.tensor_row(p + "gate_up_proj_bias", e)  # [2I]
        w2 = ckpt.tensor_row(p + "down_proj", e).t()  # [I, H] -> [H, I]
        b13 = torch.cat((gate_up_bias[0::2], gate_up_bias[1::2]))  # [2I]: w1's bias, then w3's
        return gate_up[:, 0::2].t(), gate_up[:, 1::2].t(), w2, (b13, ckpt.tensor_row(p + "down_proj_bias", e))


GPT_OSS = register(GptOss())
