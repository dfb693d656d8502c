"""MXFP4 experts in the hub layout GPT-OSS ships (quantization_config quant_method "mxfp4"): OCP
microscaling FP4, 32 e2m1 values per block sharing one power-of-two scale.

One matrix [N out, K in] in the file (a layer's tensors carry the expert dimension first, so one
expert's slice is contiguous there):
  blocks  uint8 [N, K / 32, 16]  two e2m1 values per byte: element 2j of a block is the low nibble of
                                 byte j, element 2j + 1 the high nibble
  scales  uint8 [N, K / 32]      e8m0: the block's scale is 2 ** (scale - 127)
e2m1 (sign, 2 exponent bits, 1 mantissa bit): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (nibbles
8-15). Dequantization: w = ldexp(E2M1[nibble], scale - 127) in float32 (exact: every product is a
float32). GPT-OSS fuses gate and up into one gate_up_proj [2I, H] with their rows interleaved (gate
row j at 2j, up row j at 2j + 1): the row is that fused matrix and down_proj [H, I], as the file has
them, and dequant_projection('w13') returns [gate rows; up rows] like every other format.

GPT-OSS itself is not runnable here yet (its experts add biases and a clamped SwiGLU); this format is
the storage and dequantization half. Name: 'mxfp4'.
"""

from __future__ import annotations

import torch

from .hub import HubFormat

NAME = "mxfp4"
BLOCK = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [N, K/32, 16], scales uint8 [N, K/32] -> float32 [N, K]."""
    n, g, _ = blocks.shape
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [N, g, 16, 2]
    exp = (scales.to(torch.int32) - 127)[..., None, None]
    return torch.ldexp(vals, exp).reshape(n, g * BLOCK)


class Mxfp4Format(HubFormat):
    """GPT-OSS MXFP4 experts, fused gate_up (see the module docstring)."""

    PREFIX = NAME
    name = NAME
    fused_gate_up = True

    @classmethod
    def from_name(cls, name, compute_dtype=None, group_size=128):
        if name != NAME:
            raise ValueError(f"expert format {name!r}: expected 'mxfp4'")
        return cls(compute_dtype, group_size)

    def with_scale_dtype(self, dt):
        if dt != torch.uint8:
            raise ValueError(f"mxfp4 scales are uint8 (e8m0), got {dt}")
        return self

    def matrix_specs(self, n, k):
        if k % BLOCK:
            raise ValueError(f"mxfp4 needs an input dimension divisible by {BLOCK}, got {k}")
        return [("blocks", torch.uint8, (n, k // BLOCK, 16)), ("scales", torch.uint8, (n, k // BLOCK))]

    def dequant_matrix(self, t, n, k):
        return dequant_mxfp4(t["blocks"], t["scales"])
