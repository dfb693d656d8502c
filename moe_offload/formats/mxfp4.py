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

GPT-OSS checkpoints (families/gpt_oss.py) load with it as shipped: the family reads one expert's slice
of each layer's fused tensors (`model.layers.N.mlp.experts.gate_up_proj_blocks` [E, 2I, H/32, 16],
`_scales` [E, 2I, H/32], `down_proj_blocks` [E, H, I/32, 16], `_scales` [E, H, I/32]) into the row, with
the experts' biases (gate_up_proj_bias [E, 2I] interleaved like the rows, down_proj_bias [E, H]) as the
file stores them (HubFormat.with_bias): host store bytes = the file's expert bytes. The loop backend
dequantizes a tile of output rows at a time to the compute dtype and multiplies (exact: e2m1 times a power
of two fits bfloat16 too; gate_up in the file's interleaved row order, its output columns de-interleaved
after), adds the biases and runs the clamped SwiGLU; on the CPU with int8 activations (cpu_activations)
a few tokens at a time run the compiled kernel instead, reading the blocks and scales in place
(kernel_linear; kernels/cpu_gemv.mxfp4_linear). Name: 'mxfp4'.
"""

from __future__ import annotations

import torch

from ..kernels import cpu_gemv
from .hub import HubFormat, HubPool

NAME = "mxfp4"
BLOCK = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs float32 [256, 2]: a byte's (low nibble, high nibble) e2m1 values; pow2 float32 [256]:
    2 ** (scale - 127), exact down to 2 ** -127, a subnormal; 2 ** 128 overflows to inf) on `device`."""
    if device not in _TABLES:
        lut = torch.tensor(E2M1, dtype=torch.float32)
        pairs = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=-1)  # byte b = hi << 4 | lo
        pow2 = torch.ldexp(torch.ones(256), torch.arange(256) - 127)
        _TABLES[device] = (pairs.to(device), pow2.to(device))
    return _TABLES[device]


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [N, K/32, 16], scales uint8 [N, K/32] -> float32 [N, K]: one gather of each byte's two
    values, one multiply by the block's power of two (exact: ldexp's result, 2.5x faster on the CPU)."""
    n, g, _ = blocks.shape
    pairs, pow2 = _tables(blocks.device)
    vals = pairs[blocks.long()]  # [N, g, 16, 2]: element 2j low nibble of byte j, 2j + 1 high
    if bool((scales == 255).any()):  # 2 ** 128 is inf in float32: ldexp keeps a zero code's 0 there
        return torch.ldexp(vals, (scales.to(torch.int32) - 127)[..., None, None]).reshape(n, g * BLOCK)
    return vals.mul_(pow2[scales.long()][..., None, None]).reshape(n, g * BLOCK)


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

    def row_slices(self, n, k):
        return {"blocks": (0, 1), "scales": (0, 1)}  # one row of blocks and scales per output row

    def dequant_matrix(self, t, n, k):
        return dequant_mxfp4(t["blocks"], t["scales"])

    def kernel_linear(self, pool: HubPool, which: str, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        t = pool.matrix(which, slot)
        blocks, scales = t["blocks"], t["scales"]  # [N, K/32, 16], [N, K/32]
        if (x.device.type != "cpu" or x.shape[0] > cpu_gemv.QUANT_MAX_ROWS or not blocks.is_contiguous()
                or not scales.is_contiguous() or not cpu_gemv.mxfp4_runs(x, blocks.shape[1] * BLOCK)):
            return None
        return cpu_gemv.mxfp4_linear(x, blocks, scales)
