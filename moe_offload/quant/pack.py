"""Compatibility names for quantizing and packing by format name; the code lives with each format in
moe_offload.formats (int8.py, int4.py). Callers: benchmarks/cpu_quant.py and benchmarks/gpu_check.py
(to switch to get_format(name, group_size).pack / .write / .pool_views; then delete this module)."""

from __future__ import annotations

import torch

from ..formats import DEFAULT_GROUP_SIZE, get_format
from ..formats.int4 import pack_int4, quantize_int4
from ..formats.int8 import quantize_int8
from ..kernels.pool import WeightPool


def quantize_expert(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, fmt: str,
                    group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    return get_format(fmt, group_size).pack(w1, w3, w2)


def write_expert(row: torch.Tensor, sections: dict[str, torch.Tensor], hidden: int, inter: int, fmt: str,
                 group_size: int) -> None:
    get_format(fmt, group_size).write(row, sections, hidden, inter)


def pool_views(rows: torch.Tensor, hidden: int, inter: int, fmt: str, group_size: int) -> WeightPool:
    return get_format(fmt, group_size).pool_views(rows, hidden, inter)


__all__ = ["pack_int4", "pool_views", "quantize_expert", "quantize_int4", "quantize_int8", "write_expert"]
