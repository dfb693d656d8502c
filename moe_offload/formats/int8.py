"""int8 experts: symmetric, one fp16 scale per output row: s = max|w| / 127, q = round(w / s) in
[-127, 127], w ~ q * s. The scale is rounded to fp16 before q is computed, so dequantization uses
exactly the stored scale.

Row sections (16-byte aligned): qw13 int8 [2I, H], qw2 int8 [H, I], s13 fp16 [2I], s2 fp16 [H].
Ops: the fused kernel's WEIGHT_INT8 variant; on the CPU the compiled decode kernel
(kernels.cpu_gemv.int8_linear: weights and fp16 scales read in place, up to cpu_gemv.QUANT_MAX_ROWS tokens),
else torch.ops.aten._weight_int8pack_mm(x [M, K], q int8 [N, K], scales [N]) = (x @ q.T) * s, which
reads the int8 weights in place (the scales cast, once, to the compute dtype, as the op requires).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import cpu_gemv
from ..kernels.pool import WEIGHT_INT8, WeightPool
from ..kernels.quant_cpu import CpuLinear
from .base import PackedFormat, safe_scale

# Most tokens per expert for which the CPU op beats dequantize-then-matmul, per compute dtype, measured at
# Mixtral-734M expert shapes (benchmarks/cpu_quant.py, 1 thread on a 2-core x86): bf16 600 us vs 6.8 ms
# at 1 token, still ahead at 64; float32 7.2 ms vs 5.5 ms (the op has no fast float32 path: never used).
# fp16 is not measured: the reference runs.
FAST_MAX_TOKENS = {torch.bfloat16: 64, torch.float32: 0}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s fp16 [N])."""
    w = w.float()
    s = safe_scale(w.abs().amax(dim=1) / 127)  # [N]
    q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def dequant_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [N, K], s [N] -> [N, K]: q * s in float32, then cast to `dtype` (on the CPU by the compiled
    kernel: bit-equal, one pass)."""
    if (q.device.type == "cpu" and q.is_contiguous() and s.is_contiguous() and s.dtype == torch.float16
            and dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available()):
        return cpu_gemv.dequant_int8(q, s, dtype)
    return (q.float() * s.float()[:, None]).to(dtype)


def int8_linear(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> CpuLinear:
    """q int8 [N, K], s fp16 [N] (both used in place by the compiled kernel) -> the CPU projection; PyTorch's
    int8 op (scales cast to `dtype`) where the kernel is not built."""
    if cpu_gemv.available():
        return CpuLinear(cpu_gemv.int8_linear, q, s, own_scales=False)
    return CpuLinear(torch.ops.aten._weight_int8pack_mm, q, s.to(dtype).contiguous())


@dataclass
class Int8Pool(WeightPool):
    """int8 views: w13 int8 [S, 2I, H], s13 fp16 [S, 2I]; w2 int8 [S, H, I], s2 fp16 [S, H]."""

    weight_format = WEIGHT_INT8
    fast_max_tokens = FAST_MAX_TOKENS

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        q, s, _, _ = self.projection(which)
        return dequant_int8(q[slot], s[slot])

    def dequant_rows(self, which: str, slot: int, lo: int, hi: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, s, _, _ = self.projection(which)
        return dequant_int8(q[slot, lo:hi], s[slot, lo:hi], dtype)

    def cpu_linear(self, which: str, slot: int, dtype: torch.dtype) -> CpuLinear:
        q, s, _, _ = self.projection(which)
        return int8_linear(q[slot], s[slot], dtype)

    def a8_projections(self, slot: int, x: torch.Tensor) -> tuple[cpu_gemv.A8Projection, ...] | None:
        if not (cpu_gemv.int8_activations(x, self.hidden) and cpu_gemv.int8_activations(x, self.inter)):
            return None
        return cpu_gemv.a8_int8(self.w13[slot], self.s13[slot]), cpu_gemv.a8_int8(self.w2[slot], self.s2[slot])

    def cpu_max_tokens(self, dtype: torch.dtype) -> int:
        # float32 keeps dequantize-then-matmul, what the offloaded loop computes (bit-equal runs)
        if dtype != torch.float32 and cpu_gemv.available():
            return cpu_gemv.QUANT_MAX_ROWS
        return super().cpu_max_tokens(dtype)


class Int8Format(PackedFormat):
    """Symmetric int8 with one scale per output row (see the module docstring)."""

    name = "int8"
    moe_backends = ("loop", "triton")

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [("qw13", torch.int8, (2 * inter, hidden)), ("qw2", torch.int8, (hidden, inter)),
                ("s13", torch.float16, (2 * inter,)), ("s2", torch.float16, (hidden,))]

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        (q13, s13), (q2, s2) = quantize_int8(torch.cat([w1, w3], dim=0)), quantize_int8(w2)
        return {"qw13": q13, "qw2": q2, "s13": s13, "s2": s2}

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> Int8Pool:
        v = self.views(rows, hidden, inter)
        return Int8Pool(hidden, inter, v["qw13"], v["qw2"], s13=v["s13"], s2=v["s2"])
