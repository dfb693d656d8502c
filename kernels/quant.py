"""Quantized slot pools as the kernels read them, and their torch dequantization (the reference).

A QuantPool holds per-slot views (slot dimension first) of one uint8 pool whose rows are packed
experts (layout: moe_offload.quant.formats). Formats:
  int8  qw13 int8 [S, 2I, H], s13 fp16 [S, 2I]; qw2 int8 [S, H, I], s2 fp16 [S, H].
        w = q * s (symmetric, one scale per output row).
  int4  qw13 uint8 [S, 2I, ceil(H/2)], s13 / z13 fp16 [S, 2I, ceil(H/G)]; likewise qw2 [S, H, ceil(I/2)],
        s2 / z2 [S, H, ceil(I/G)]. Weight k of a row is the low nibble of byte k//2 (k even) or the
        high nibble (k odd); w = (q - z) * s with the scale and zero of group k // G.
Dequantization is done in float32, then cast to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantPool:
    """Views of a quantized slot pool (see module docstring). z13 / z2 are None for int8."""

    fmt: str
    group_size: int
    hidden: int
    inter: int
    qw13: torch.Tensor
    s13: torch.Tensor
    z13: torch.Tensor | None
    qw2: torch.Tensor
    s2: torch.Tensor
    z2: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.fmt not in ("int8", "int4"):
            raise ValueError(f"QuantPool format {self.fmt!r} is not 'int8' or 'int4'")
        if self.fmt == "int4" and (self.z13 is None or self.z2 is None):
            raise ValueError("an int4 QuantPool needs zero points z13 and z2")

    @property
    def num_slots(self) -> int:
        return self.qw13.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qw13.device

    def dequant(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert in `slot` as (w13 [2I, H], w2 [H, I]) in `dtype`."""
        if self.fmt == "int8":
            w13 = dequant_int8(self.qw13[slot], self.s13[slot])
            w2 = dequant_int8(self.qw2[slot], self.s2[slot])
        else:
            w13 = dequant_int4(self.qw13[slot], self.s13[slot], self.z13[slot], self.hidden, self.group_size)
            w2 = dequant_int4(self.qw2[slot], self.s2[slot], self.z2[slot], self.inter, self.group_size)
        return w13.to(dtype), w2.to(dtype)


def dequant_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], s [N] -> float32 [N, K]."""
    return q.float() * s.float()[:, None]


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed uint8 [N, ceil(K/2)] -> uint8 [N, K] of values in [0, 15] (low nibble first)."""
    pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [N, ceil(K/2), 2]
    return pairs.reshape(packed.shape[0], -1)[:, :k]


def dequant_int4(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """packed uint8 [N, ceil(K/2)], s / z [N, ceil(K/G)] -> float32 [N, K]: (q - z) * s per group."""
    q = unpack_int4(packed, k).float()  # [N, K]
    g = torch.arange(k, device=packed.device) // group_size  # [K] group of each input column
    return (q - z.float()[:, g]) * s.float()[:, g]
