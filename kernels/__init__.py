"""Triton MoE kernels and their torch references. Ships as `moe_offload.kernels` (never as `kernels`:
a PyPI package of that name exists and transformers imports it)."""

from .align import Alignment, moe_align_block_size
from .configs import TileConfig, tile_config
from .fused_moe import check_resident, fused_moe
from .reference import fused_moe_grouped_mm, fused_moe_reference, grouped_mm_supported

__all__ = ["Alignment", "TileConfig", "check_resident", "fused_moe", "fused_moe_grouped_mm",
           "fused_moe_reference", "grouped_mm_supported", "moe_align_block_size", "tile_config"]
