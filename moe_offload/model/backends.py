"""Which code runs the experts of a layer: Triton kernels, torch._grouped_mm, or a per-expert loop.

All three share one contract (see moe_offload.kernels.fused_moe): hidden [N, H], ids/weights [N, k],
a slot pool (w13 [S, 2I, H], w2 [S, H, I]) and a slot table [E] expert -> slot.
"""

from __future__ import annotations

import os

import torch

from ..config import MixtralConfig
from ..errors import MoeOffloadError
from .moe import moe_loop

MOE_BACKENDS = ("auto", "triton", "grouped_mm", "loop")


def grouped_mm_aligned(hidden_size: int, intermediate_size: int, itemsize: int) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes."""
    return (hidden_size * itemsize) % 16 == 0 and (intermediate_size * itemsize) % 16 == 0


def resolve_moe_backend(name: str, device: torch.device, dtype: torch.dtype, cfg: MixtralConfig) -> str:
    """'auto' -> triton on cuda; on cpu the per-expert loop (measured faster than torch._grouped_mm on
    CPU for every token count tried; see the kernels issue note). Explicit choices are checked."""
    if name not in MOE_BACKENDS:
        raise MoeOffloadError(f"moe_backend {name!r} is not one of {list(MOE_BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "loop"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MoeOffloadError("moe_backend 'triton' on device cpu runs only under the Triton interpreter: "
                              "set TRITON_INTERPRET=1 in the environment before starting (slow; for tests)")
    if name == "grouped_mm":
        item = torch.tensor([], dtype=dtype).element_size()
        if not hasattr(torch, "_grouped_mm"):
            raise MoeOffloadError(f"moe_backend 'grouped_mm': torch {torch.__version__} has no torch._grouped_mm")
        if not grouped_mm_aligned(cfg.hidden_size, cfg.intermediate_size, item):
            raise MoeOffloadError(
                f"moe_backend 'grouped_mm' needs hidden_size and intermediate_size rows of a multiple of 16 "
                f"bytes; got {cfg.hidden_size} and {cfg.intermediate_size} in {dtype}; use 'loop'")
    return name


def run_experts(backend: str, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                w13_pool: torch.Tensor, w2_pool: torch.Tensor, slot_of_expert: torch.Tensor,
                slot_list: list[int] | None = None) -> torch.Tensor:
    """h [N, H], ids/weights [N, k] -> [N, H]. slot_list: the host copy of slot_of_expert for the loop
    (None means identity), so the loop path needs no device read of the slot table."""
    if backend == "loop":
        return moe_loop(h, ids, weights, w13_pool, w2_pool, slot_list)
    if backend == "triton":
        from ..kernels import fused_moe

        return fused_moe(h, ids, weights, w13_pool, w2_pool, slot_of_expert)
    if backend == "grouped_mm":
        from ..kernels import fused_moe_grouped_mm

        return fused_moe_grouped_mm(h, ids, weights, w13_pool, w2_pool, slot_of_expert)
    raise MoeOffloadError(f"unknown moe backend {backend!r}")
