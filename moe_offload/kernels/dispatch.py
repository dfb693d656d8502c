"""Which code runs a layer's experts: Triton kernels, torch._grouped_mm, or the per-expert loop.

All three share one contract (see fused_moe.py): hidden [N, H], ids/weights [N, k], a slot pool
(w13 [S, 2I, H], w2 [S, H, I], or a pool.WeightPool and None) and a slot table [E] expert -> slot. This module imports nothing from
the model: errors are ValueError, which the runtime turns into its own.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from .fused_moe import fused_moe
from .reference import fused_moe_grouped_mm, grouped_mm_aligned, moe_loop

MOE_BACKENDS = ("auto", "triton", "grouped_mm", "loop")


def resolve_moe_backend(name: str, device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> str:
    """'auto' -> triton on cuda; on cpu the per-expert loop (measured faster than torch._grouped_mm on
    CPU for every token count tried). Explicit choices are checked (ValueError names the problem)."""
    if name not in MOE_BACKENDS:
        raise ValueError(f"moe_backend {name!r} is not one of {list(MOE_BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "loop"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("moe_backend 'triton' on device cpu runs only under the Triton interpreter: "
                         "set TRITON_INTERPRET=1 in the environment before starting (slow; for tests)")
    if name == "grouped_mm":
        item = torch.tensor([], dtype=dtype).element_size()
        if not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"moe_backend 'grouped_mm': torch {torch.__version__} has no torch._grouped_mm")
        if not grouped_mm_aligned(hidden, inter, item):
            raise ValueError(
                f"moe_backend 'grouped_mm' needs hidden_size and intermediate_size rows of a multiple of 16 "
                f"bytes; got {hidden} and {inter} in {dtype}; use 'loop'")
    return name


def run_experts(backend: str, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                w13_pool: Any, w2_pool: torch.Tensor | None, slot_of_expert: torch.Tensor,
                slot_list: Sequence[int] | None = None, ids_host: np.ndarray | None = None) -> torch.Tensor:
    """h [N, H], ids/weights [N, k] -> [N, H]. For the loop: slot_list is the host copy of
    slot_of_expert (None: identity) and ids_host the host copy of ids, so it reads nothing back."""
    if backend == "loop":
        return moe_loop(h, ids, weights, w13_pool, w2_pool, slot_list, ids_host=ids_host)
    if getattr(w13_pool, "loop_only", False):  # experts with biases / their own activation (GPT-OSS)
        raise ValueError(f"experts with biases and their own activation (GPT-OSS) run on the loop backend only, "
                         f"not {backend!r}: pass moe_backend='loop'")
    if backend == "triton":  # float tensors, or a pool object and None (any weight format)
        return fused_moe(h, ids, weights, w13_pool, w2_pool, slot_of_expert)
    if backend == "grouped_mm":
        return fused_moe_grouped_mm(h, ids, weights, w13_pool, w2_pool, slot_of_expert)
    raise ValueError(f"unknown moe backend {backend!r}")
