"""Formats with a size but no storage or kernels: int3 / int2 experts laid out like int4 (each row
packed on its own, an fp16 scale and zero point per group), for the simulator's and `info`'s
projections of what fewer bits per weight would buy."""

from __future__ import annotations

import torch

from ..kernels.pool import WeightPool
from .base import DEFAULT_GROUP_SIZE, PackedFormat
from .int4 import group_sections


class ProjectedIntFormat(PackedFormat):
    """`bits`-bit grouped weights: expert_bytes and layout only; packing and running are refused."""

    runnable = False
    moe_backends = ()

    def __init__(self, bits: int, compute_dtype: torch.dtype | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(compute_dtype, group_size)
        self.bits, self.name = bits, f"int{bits}"

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return group_sections(hidden, inter, self.bits, self.group_size)

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"expert format {self.name!r} is a size for projections; it is not stored")

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> WeightPool:
        raise NotImplementedError(f"expert format {self.name!r} is a size for projections; it does not run")
