"""Experts kept in the compute dtype (fp32 / bf16 / fp16): no packing, no scales.

Row layout: w13 [2I, H] (w1 rows, then w3 rows) then w2 [H, I], flattened, in the row dtype; 2 or 4
bytes per weight, no padding. Every backend runs it (the fused kernel's WEIGHT_FLOAT variant).

Experts with biases (GPT-OSS: ModelConfig.expert_bias) add two sections after w2: b13 [2I] (w1's bias,
then w3's) and b2 [H], so the biases travel with their expert (host store row -> device slot row). Such a
format (bias=True) also carries the experts' activation (`act`: kernels.ClampedSwiGLU, or None for SwiGLU)
into the pools it builds (kernels.BiasedFloatPool); they run on the loop backend only."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.pool import BiasedFloatPool, FloatPool
from .base import DEFAULT_GROUP_SIZE, ExpertFormat

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FloatFormat(ExpertFormat):
    """Experts as float weights in `dtype` (also the compute dtype); bias: with their biases' sections,
    run by `act` (see the module docstring)."""

    quantized = False

    def __init__(self, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE, *, bias: bool = False,
                 act: Any = None):
        super().__init__(dtype, group_size)
        names = {dt: name for name, dt in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"float expert format needs one of {list(FLOAT_DTYPES)}, got {dtype}")
        self.dtype, self.name = dtype, names[dtype]
        self.bias, self.act = bias, act
        if bias or act is not None:
            self.moe_backends = ("loop",)

    def __repr__(self) -> str:
        return f"FloatFormat({self.name!r}, bias)" if self.bias else super().__repr__()

    @property
    def row_dtype(self) -> torch.dtype:
        return self.dtype

    def row_elems(self, hidden: int, inter: int) -> int:
        """Elements of one row: the three weights, and the biases [2I] + [H] where the format has them."""
        return 3 * hidden * inter + ((2 * inter + hidden) if self.bias else 0)

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return self.row_elems(hidden, inter) * torch.tensor([], dtype=self.dtype).element_size()

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
             bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = {"w13": torch.cat([w1, w3]).to(self.dtype), "w2": w2.to(self.dtype)}
        if self.bias:
            out.update(b13=bias[0].to(self.dtype), b2=bias[1].to(self.dtype))
        return out

    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        parts = self._split(row, hidden, inter)
        parts[0].copy_(packed["w13"])
        parts[1].copy_(packed["w2"])
        if self.bias:
            parts[2].copy_(packed["b13"])
            parts[3].copy_(packed["b2"])

    def put(self, row: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, hidden: int,
            inter: int, bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One float expert into one row, copied in place (no concatenated temporary); bias (b13 [2I],
        b2 [H]) is required exactly when the format has bias sections."""
        if self.bias != (bias is not None):
            raise ValueError(f"{self!r}: expert biases {'missing' if self.bias else 'given to a format without them'}")
        parts = self._split(row, hidden, inter)
        parts[0][:inter].copy_(w1)
        parts[0][inter:].copy_(w3)
        parts[1].copy_(w2)
        if self.bias:
            parts[2].copy_(bias[0])
            parts[3].copy_(bias[1])

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> FloatPool:
        s, n13, n2 = rows.shape[0], 2 * inter * hidden, hidden * inter
        w13 = rows[:, :n13].view(s, 2 * inter, hidden)
        w2 = rows[:, n13:n13 + n2].view(s, hidden, inter)
        if not self.bias and self.act is None:
            return FloatPool(hidden, inter, w13, w2)
        b13 = rows[:, n13 + n2:n13 + n2 + 2 * inter] if self.bias else None  # [S, 2I]
        b2 = rows[:, n13 + n2 + 2 * inter:] if self.bias else None  # [S, H]
        return BiasedFloatPool(hidden, inter, w13, w2, b13=b13, b2=b2, act=self.act)

    def _split(self, row: torch.Tensor, hidden: int, inter: int) -> list[torch.Tensor]:
        """One row -> views w13 [2I, H], w2 [H, I] (and b13 [2I], b2 [H] with biases)."""
        n13, n2 = 2 * inter * hidden, hidden * inter
        out = [row[:n13].view(2 * inter, hidden), row[n13:n13 + n2].view(hidden, inter)]
        if self.bias:
            out += [row[n13 + n2:n13 + n2 + 2 * inter], row[n13 + n2 + 2 * inter:n13 + n2 + 2 * inter + hidden]]
        return out
