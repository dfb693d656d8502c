"""GPT-OSS-20B / 120B (GptOssForCausalLM), parsed for `info` and `simulate` only: grouped-query
attention with q/k/v/o biases and a learned sink per head, alternating sliding-window / full layers
(layer_types), yarn RoPE; experts with biases and the clamped SwiGLU (swiglu_limit), a router with a
bias whose top-k logits are softmaxed; MXFP4 experts as shipped. load() refuses the model."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Family, rope_type
from .registry import register


class GptOss(Family):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    experts_key, width_key = "num_local_experts", "intermediate_size"
    defaults = dict(rms_norm_eps=1e-5, rope_theta=150000.0, bos_token_id=None, eos_token_id=200002,
                    norm_topk_prob=True)
    rope_types = ("default", "yarn")

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        pass  # attention_bias and the sliding window are this family's own; nothing is run

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        qc = raw.get("quantization_config") or {}
        return "mxfp4" if qc.get("quant_method") == "mxfp4" else None

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        types = raw.get("layer_types") or []
        return {**super().fields(raw),
                "qkv_bias": bool(raw.get("attention_bias", True)), "o_bias": bool(raw.get("attention_bias", True)),
                "attention_sinks": True, "expert_bias": True, "router_logit_bias": True,
                "scoring": "topk_softmax", "sliding_window": raw.get("sliding_window"),
                "sliding_window_layers": sum(t == "sliding_attention" for t in types),
                "rope_type": rope_type(raw)}

    def unsupported(self, cfg: Any) -> str | None:
        return (f"{self.model_type}: attention sinks, alternating sliding-window layers, yarn RoPE, expert biases "
                "and the clamped SwiGLU are not implemented yet; `info` and `simulate` work")


GPT_OSS = register(GptOss())
