"""What a published MoE checkpoint needs and how fast it would decode, in the formats it ships in.

memory_needs(cfg, fmt): host RAM for every expert (the host store, or the file when read in place) and
the device memory this runtime needs at the least (dense weights, a KV cache of KV_TOKENS tokens, top-k
expert slots per MoE layer, the reserve), from the format objects' byte sizes (sim.expert_layer_bytes).
shipped_formats(cfg): the formats worth projecting for a config (its shipped one, bf16, int4, Q4_K_M-like).
`moe-offload info --config` prints these; benchmarks/projections.py adds projected decode speed.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..offload.plan import device_reserve_bytes
from .bench import KV_TOKENS
from .sim import SHIPPED_FORMATS, expert_layer_bytes

# bytes per dense parameter on the device: this runtime dequantizes every non-expert tensor of a quantized
# checkpoint (GGUF, FP8, GPTQ, ...) to the compute dtype at load, so the dense weights are bf16 whatever the
# file ships (the routed experts stay as stored)
DENSE_BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "int8": 2.0, "int4": 2.0, "int3": 2.0, "int2": 2.0,
                         "fp8": 2.0, "mxfp4": 2.0, "q4_k_m": 2.0}


def dense_bytes_per_param(expert_dtype: str) -> float:
    """Dense weights' bytes per parameter on the device for a checkpoint of `expert_dtype`: bf16 for every
    format (non-expert tensors are dequantized at load; a Q4_K_M or FP8 file's own dense bytes are smaller)."""
    return DENSE_BYTES_PER_PARAM[expert_dtype]


def shipped_formats(cfg: ModelConfig) -> list[str]:
    """The simulator's format names worth projecting for `cfg`: the format it ships in (fp8 / mxfp4),
    or bf16 when it ships unquantized, then int4 (this runtime's) and q4_k_m (llama.cpp's mix) where the
    shapes allow them (MXFP4 checkpoints: their own format only)."""
    if cfg.shipped_format == "mxfp4":
        return ["mxfp4"]
    out = ["fp8"] if cfg.shipped_format == "fp8_block128" else ["bf16"]
    return out + ["int4", "q4_k_m"]


def memory_needs(cfg: ModelConfig, expert_dtype: str, kv_tokens: int = KV_TOKENS) -> dict[str, Any]:
    """Bytes a model needs in `expert_dtype` (one of sim.SIM_DTYPES): host_ram (every expert),
    device_min (dense + KV cache + top-k slots per MoE layer + reserve) and the parts."""
    layers = expert_layer_bytes(cfg, expert_dtype)
    experts = cfg.num_local_experts * sum(layers)
    dense = int(cfg.dense_params * dense_bytes_per_param(expert_dtype))
    kv = cfg.kv_elements_per_token * kv_tokens * 2
    slots = cfg.num_experts_per_tok * cfg.num_moe_layers * max(layers)
    base = dense + kv + slots
    reserve = device_reserve_bytes(base)
    return {"format": expert_dtype, "format_name": SHIPPED_FORMATS.get(expert_dtype) or expert_dtype,
            "one_expert_bytes": round(sum(layers) / len(layers)), "bits_per_weight": 8 * sum(layers) / len(layers)
            / cfg.expert_params, "host_ram_bytes": experts, "dense_bytes": dense, "kv_cache_bytes": kv,
            "kv_tokens": kv_tokens, "min_slot_bytes": slots, "device_min_bytes": base + reserve,
            "device_all_resident_bytes": dense + kv + experts + device_reserve_bytes(dense + kv + experts)}
