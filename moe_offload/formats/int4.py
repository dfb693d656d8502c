"""int4 experts, per group of G weights along the input dimension, in two variants with one row layout:

  int4 (symmetric, the default): s = max|w| / 7.5 over the group, q = clamp(round(w / s), -8, 7) + 8 in
       [0, 15], z = 8; w ~ (q - 8) * s. This is compressed-tensors' symmetric int4 (its scale rule and
       range), the variant transformers (5.25, compressed-tensors 0.20) and vLLM load from `moe-offload
       quantize`'s folders: they decompress MoE experts without zero points.
  int4-asym: s = (max - min) / 15 over the group (with 0 inside [min, max]), z = round(-min / s) in
       [0, 15], q = round(w / s) + z in [0, 15]; w ~ (q - z) * s. Needed to read asymmetric
       pack-quantized checkpoints; transformers 5.25 cannot load such a folder.

Scales are rounded to fp16 before q is computed, so dequantization uses exactly the stored scale. Both
variants store z (all 8 for the symmetric one), so the kernels have one int4 path. Two weights per byte along the input dimension: weight k of a row is the low nibble of
byte k // 2 when k is even, the high nibble when k is odd.

Row sections (16-byte aligned): qw13 uint8 [2I, ceil(H/2)], qw2 uint8 [H, ceil(I/2)], then s13, z13
fp16 [2I, ceil(H/G)] and s2, z2 fp16 [H, ceil(I/G)].
Ops: the fused kernel's WEIGHT_INT4 variant (GROUP = G); on the CPU
torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], w [N, K/2], G, sz [K/G, N, 2]) with
w = (q - 8) * sz[..., 0] + sz[..., 1] per group, so sz = (s, (8 - z) * s) (computed in float32, then
cast). The op wants its own nibble order (`_convert_weight_to_int4pack_for_cpu`), so weights are repacked
once when a pool is prepared: a copy the size of the packed weights, plus the scales/zeros in the compute
dtype. Needs N % 16 == 0 and K % G == 0; other shapes keep dequantize-then-matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..kernels import cpu_gemv
from ..kernels.pool import WEIGHT_INT4, WeightPool
from ..kernels.quant_cpu import CpuLinear
from .base import PackedFormat, safe_scale

# Most tokens per expert for which the CPU op beats dequantize-then-matmul, per compute dtype (measured as
# int8's, benchmarks/cpu_quant.py): bf16 0.34 ms vs 45 ms at 1 token, still ahead at 64; float32 16 ms vs
# 44 ms at 1 token, behind from 4. fp16 is not measured: the reference runs.
FAST_MAX_TOKENS = {torch.bfloat16: 64, torch.float32: 1}


def group_sections(hidden: int, inter: int, bits: int, group_size: int) -> list[tuple[str, torch.dtype, tuple]]:
    """Sections of an expert with `bits`-bit weights (each row packed on its own: ceil(K * bits / 8)
    bytes) and an fp16 scale and zero point per group of `group_size` along the input dimension."""
    g13, g2 = -(-hidden // group_size), -(-inter // group_size)
    return [("qw13", torch.uint8, (2 * inter, -(-hidden * bits // 8))), ("qw2", torch.uint8, (hidden, -(-inter * bits // 8))),
            ("s13", torch.float16, (2 * inter, g13)), ("z13", torch.float16, (2 * inter, g13)),
            ("s2", torch.float16, (hidden, g2)), ("z2", torch.float16, (hidden, g2))]


# The symmetric scale: max|w| / SYMMETRIC_DIVISOR (compressed-tensors: the bit range 15 over 2).
SYMMETRIC_DIVISOR = 7.5


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, ceil(K/2)], s fp16 [N, ceil(K/G)], z fp16 [N, ceil(K/G)]); symmetric:
    z = 8 everywhere (see the module docstring)."""
    w = w.float()
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, groups, group_size)  # [N, g, G]; pad is 0
    if symmetric:
        s = safe_scale(wg.abs().amax(-1) / SYMMETRIC_DIVISOR)  # [N, g]
        q = (torch.round(wg / s.float()[..., None]).clamp_(-8, 7) + 8).to(torch.uint8)
        return pack_int4(q.view(n, -1)[:, :k]), s, torch.full_like(s, 8.0)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # [N, g], 0 inside [lo, hi]
    s = safe_scale((hi - lo) / 15)  # [N, g]
    z = torch.round(-lo / s.float()).clamp_(0, 15)  # [N, g] integer zero points
    q = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, -1)[:, :k]  # [N, K]
    return pack_int4(q), s, z.to(torch.float16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values uint8 [N, K] in [0, 15] -> bytes [N, ceil(K/2)], even k in the low nibble."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed uint8 [N, ceil(K/2)] -> uint8 [N, K] of values in [0, 15] (low nibble first)."""
    pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [N, ceil(K/2), 2]
    return pairs.reshape(packed.shape[0], -1)[:, :k]


def dequant_int4(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, group_size: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [N, ceil(K/2)], s / z [N, ceil(K/G)] -> [N, K]: (q - z) * s per group in float32, then
    cast to `dtype` (on the CPU by the compiled kernel where it takes the shape: bit-equal, 20-50x
    faster)."""
    if (packed.device.type == "cpu" and k == 2 * packed.shape[1] and k % group_size == 0 and packed.is_contiguous()
            and s.is_contiguous() and z.is_contiguous() and s.dtype == z.dtype == torch.float16
            and dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available()):
        return cpu_gemv.dequant_int4(packed, s, z, group_size, dtype)
    q = unpack_int4(packed, k).float()  # [N, K]
    g = torch.arange(k, device=packed.device) // group_size  # [K] group of each input column
    return ((q - z.float()[:, g]) * s.float()[:, g]).to(dtype)


def int4_shape_ok(n: int, k: int, group_size: int) -> bool:
    """The int4 CPU op's shape rules: N a multiple of 16, K a multiple of the group size."""
    return n % 16 == 0 and k % group_size == 0


def int4_linear(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, group_size: int,
                dtype: torch.dtype, symmetric: bool = False) -> CpuLinear | None:
    """packed uint8 [N, ceil(K/2)], s / z [N, K/G] -> the CPU projection: the compiled kernel reading
    all three in place (K even and a multiple of G; `symmetric`: z is all 8 and not read), else
    PyTorch's int4 op on a repacked copy, or None when neither takes this shape."""
    if k % 2 == 0 and k % group_size == 0 and cpu_gemv.available():
        return CpuLinear(partial(_int4_native, z, group_size, symmetric), packed, s, own_scales=False)
    n = packed.shape[0]
    if not int4_shape_ok(n, k, group_size):
        return None
    q = unpack_int4(packed, k).to(torch.int32)  # [N, K] values in [0, 15]
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] the op's nibble order
    s32 = s.float()
    sz = torch.stack([s32, (8 - z.float()) * s32], dim=-1)  # [N, K/G, 2]: w = (q - 8) * s + (8 - z) * s
    op = partial(_int4_mm, group_size)
    return CpuLinear(op, w, sz.transpose(0, 1).contiguous().to(dtype), repacked=True)


def _int4_native(z: torch.Tensor, group_size: int, symmetric: bool, x: torch.Tensor, w: torch.Tensor,
                 s: torch.Tensor) -> torch.Tensor:
    return cpu_gemv.int4_linear(x, w, s, z, group_size, symmetric)


def _int4_mm(group_size: int, x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group_size, sz)


@dataclass
class Int4Pool(WeightPool):
    """int4 views: w13 uint8 [S, 2I, ceil(H/2)], s13 / z13 fp16 [S, 2I, ceil(H/G)]; w2 uint8
    [S, H, ceil(I/2)], s2 / z2 fp16 [S, H, ceil(I/G)]. `symmetric`: every zero point is 8."""

    symmetric: bool = False
    weight_format = WEIGHT_INT4
    fast_max_tokens = FAST_MAX_TOKENS

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        q, s, z, k = self.projection(which)
        return dequant_int4(q[slot], s[slot], z[slot], k, self.group_size)

    def dequant_rows(self, which: str, slot: int, lo: int, hi: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, s, z, k = self.projection(which)
        return dequant_int4(q[slot, lo:hi], s[slot, lo:hi], z[slot, lo:hi], k, self.group_size, dtype)

    def cpu_linear(self, which: str, slot: int, dtype: torch.dtype) -> CpuLinear | None:
        q, s, z, k = self.projection(which)
        return int4_linear(q[slot], s[slot], z[slot], k, self.group_size, dtype, self.symmetric)

    def a8_projections(self, slot: int, x: torch.Tensor) -> tuple[cpu_gemv.A8Projection, ...] | None:
        h, i, g = self.hidden, self.inter, self.group_size
        if h % g or i % g or not (cpu_gemv.int8_activations(x, h) and cpu_gemv.int8_activations(x, i)):
            return None
        w13 = cpu_gemv.a8_int4(self.w13[slot], self.s13[slot], self.z13[slot], g, self.symmetric)
        w2 = cpu_gemv.a8_int4(self.w2[slot], self.s2[slot], self.z2[slot], g, self.symmetric)
        return None if w13 is None or w2 is None else (w13, w2)

    def cpu_max_tokens(self, dtype: torch.dtype) -> int:
        # float32 keeps dequantize-then-matmul, what the offloaded loop computes (bit-equal runs)
        if dtype != torch.float32 and cpu_gemv.available():  # 128-weight steps with int8 activations: 16
            return cpu_gemv.INT4_MAX_ROWS if cpu_gemv.activations() != "exact" and cpu_gemv.has_vnni() \
                else cpu_gemv.QUANT_MAX_ROWS
        return super().cpu_max_tokens(dtype)


class Int4Format(PackedFormat):
    """int4 in groups of `group_size` along the input dimension, symmetric ('int4') or not ('int4-asym');
    see the module docstring."""

    moe_backends = ("loop", "triton")

    def __init__(self, compute_dtype: torch.dtype | None = None, group_size: int = 128, symmetric: bool = True):
        super().__init__(compute_dtype, group_size)
        self.symmetric = symmetric
        self.name = "int4" if symmetric else "int4-asym"

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return group_sections(hidden, inter, 4, self.group_size)

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.group_size
        sym = self.symmetric
        (q13, s13, z13), (q2, s2, z2) = quantize_int4(torch.cat([w1, w3], dim=0), g, sym), quantize_int4(w2, g, sym)
        return {"qw13": q13, "qw2": q2, "s13": s13, "z13": z13, "s2": s2, "z2": z2}

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> Int4Pool:
        v = self.views(rows, hidden, inter)
        return Int4Pool(hidden, inter, v["qw13"], v["qw2"], s13=v["s13"], s2=v["s2"], z13=v["z13"], z2=v["z2"],
                        group_size=self.group_size, symmetric=self.symmetric)
