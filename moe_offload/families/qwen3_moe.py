"""Qwen3-MoE (Qwen3MoeForCausalLM): per-head q/k RMSNorm, softmax top-k renormalised when
norm_topk_prob, every layer sparse, no sliding window.

Qwen3-*-FP8 checkpoints (quantization_config quant_method "fp8", weight_block_size [128, 128]; every
linear float8_e4m3fn with a `weight_scale_inv` per block but the embeddings, norms, router gates and
lm_head) load as stored: the routed experts stay FP8 (the 'fp8:128x128' hub format, formats/fp8.py), the
attention's FP8 linears are dequantized into the compute dtype as they load, one tensor at a time."""

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
