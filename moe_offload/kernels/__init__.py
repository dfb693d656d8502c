"""Triton MoE kernels, their torch references and the backend dispatch: a leaf that imports nothing
from the rest of moe_offload. Lives inside the package (never importable as `kernels`: a PyPI package
of that name exists and transformers imports it)."""

from .align import Alignment, moe_align_block_size
from .configs import TileConfig, tile_config
from .dispatch import MOE_BACKENDS, resolve_moe_backend, run_experts
from .fused_moe import check_resident, fused_moe, fused_moe_quant
from .pool import WEIGHT_FLOAT, WEIGHT_INT4, WEIGHT_INT8, BiasedFloatPool, FloatPool, WeightPool
from .reference import (ClampedSwiGLU, expert_ffn, fused_moe_grouped_mm, linear, fused_moe_reference, grouped_mm_aligned,
                        grouped_mm_supported, moe_loop, one_token_experts)


__all__ = ["Alignment", "BiasedFloatPool", "ClampedSwiGLU", "FloatPool", "MOE_BACKENDS", "TileConfig", "WEIGHT_FLOAT", "WEIGHT_INT4", "WEIGHT_INT8",
           "WeightPool", "check_resident", "expert_ffn", "fused_moe", "fused_moe_grouped_mm", "fused_moe_quant",
           "fused_moe_reference", "grouped_mm_aligned", "grouped_mm_supported", "linear", "moe_align_block_size", "moe_loop",
           "one_token_experts", "resolve_moe_backend", "run_experts", "tile_config"]
