"""Experts kept in the compute dtype (fp32 / bf16 / fp16): no packing, no scales.

Row layout: w13 [2I, H] (w1 rows, then w3 rows) then w2 [H, I], flattened, in the row dtype; 2 or 4
bytes per weight, no padding. Every backend runs it (the fused kernel's WEIGHT_FLOAT variant)."""

from __future__ import annotations

import torch

from ..kernels.pool import FloatPool
from .base import DEFAULT_GROUP_SIZE, ExpertFormat

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FloatFormat(ExpertFormat):
    """Experts as float weights in `dtype` (also the compute dtype)."""

    quantized = False

    def __init__(self, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(dtype, group_size)
        names = {dt: name for name, dt in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"float expert format needs one of {list(FLOAT_DTYPES)}, got {dtype}")
        self.dtype, self.name = dtype, names[dtype]

    @property
    def row_dtype(self) -> torch.dtype:
        return self.dtype

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return 3 * hidden * inter * torch.tensor([], dtype=self.dtype).element_size()

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w13": torch.cat([w1, w3]).to(self.dtype), "w2": w2.to(self.dtype)}

    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        w13, w2 = self._split(row, hidden, inter)
        w13.copy_(packed["w13"])
        w2.copy_(packed["w2"])

    def put(self, row: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, hidden: int,
            inter: int) -> None:
        w13, w2_row = self._split(row, hidden, inter)  # copied in place: no concatenated temporary
        w13[:inter].copy_(w1)
        w13[inter:].copy_(w3)
        w2_row.copy_(w2)

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> FloatPool:
        s, n13 = rows.shape[0], 2 * inter * hidden
        return FloatPool(hidden, inter, rows[:, :n13].view(s, 2 * inter, hidden), rows[:, n13:].view(s, hidden, inter))

    @staticmethod
    def _split(row: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One row [3*H*I] -> (w13 [2I, H], w2 [H, I]) views."""
        n13 = 2 * inter * hidden
        return row[:n13].view(2 * inter, hidden), row[n13:].view(hidden, inter)
