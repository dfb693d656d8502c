"""Quantized experts on the CPU through PyTorch's own weight-only kernels.

  int8  torch.ops.aten._weight_int8pack_mm(x [M, K], q int8 [N, K], scales [N]) -> [M, N]: y = (x @ q.T) * s.
        Reads the packed row's int8 weights in place; only the scales are cast (once) to the compute
        dtype, which the op requires.
  int4  torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], w [N, K/2], G, sz [K/G, N, 2]) -> [M, N] with
        w = (q - 8) * sz[..., 0] + sz[..., 1] per group. Our format is w = (q - z) * s, so
        sz = (s, (8 - z) * s) (computed in float32, then cast). The op wants its own nibble order
        (`_convert_weight_to_int4pack_for_cpu`), so weights are repacked once when the pool is prepared:
        a CPU-side copy the size of the packed weights, plus the scales/zeros in the compute dtype.
        Needs N % 16 == 0 and K % G == 0; other shapes keep the dequantize-then-matmul reference.

Which path runs is chosen per dtype and token count from measurements (benchmarks/cpu_quant.py):
the weight-only ops win at decode; dequantize-then-matmul (one F.linear on the whole batch) wins once
enough tokens share an expert. The host store's packed rows are never changed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import QuantPool, unpack_int4
from .reference import expert_ffn

# Most tokens per expert for which the weight-only ops beat dequantize-then-matmul, per (format, compute
# dtype), measured at Mixtral-734M expert shapes (benchmarks/cpu_quant.py, 1 thread on a busy 2-core x86;
# results/cpu_quant_issue11.json): bf16 int8 600 us vs 6.8 ms at 1 token, still ahead at 64; bf16 int4
# 0.34 ms vs 45 ms; float32 int8 7.2 ms vs 5.5 ms (the op has no fast float32 path: never used);
# float32 int4 16 ms vs 44 ms at 1 token, behind from 4. fp16 is not measured: the reference runs.
FAST_MAX_TOKENS = {("int8", torch.bfloat16): 64, ("int4", torch.bfloat16): 64,
                   ("int8", torch.float32): 0, ("int4", torch.float32): 1}


def int4_shape_ok(n: int, k: int, group_size: int) -> bool:
    """The int4 CPU op's shape rules: N a multiple of 16, K a multiple of the group size."""
    return n % 16 == 0 and k % group_size == 0


@dataclass
class CpuQuantLinear:
    """One projection [N, K] ready for a weight-only CPU op: `weight` (int8 [N, K] or int4-packed uint8
    [N, K/2]) and `scales` ([N] or [K/G, N, 2]) in the compute dtype."""

    fmt: str
    weight: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        if self.fmt not in ("int8", "int4"):
            raise ValueError(f"CpuQuantLinear format {self.fmt!r} is not 'int8' or 'int4'")
        if self.weight.device.type != "cpu":
            raise ValueError(f"CpuQuantLinear weight is on {self.weight.device}, the ops run on cpu only")

    @property
    def extra_bytes(self) -> int:
        """Bytes held beyond the packed row (the repacked int4 weights; the cast scales)."""
        own = self.weight.nbytes if self.fmt == "int4" else 0
        return own + self.scales.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        if self.fmt == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales)


def int8_linear(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> CpuQuantLinear:
    """q int8 [N, K] (used in place), s [N] -> the int8 op's projection in `dtype`."""
    return CpuQuantLinear("int8", q, s.to(dtype).contiguous(), 0)


def int4_linear(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, group_size: int,
                dtype: torch.dtype) -> CpuQuantLinear | None:
    """packed uint8 [N, ceil(K/2)], s / z [N, K/G] -> the int4 op's projection (repacked), or None when
    the op does not take this shape."""
    n = packed.shape[0]
    if not int4_shape_ok(n, k, group_size):
        return None
    q = unpack_int4(packed, k).to(torch.int32)  # [N, K] values in [0, 15]
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] the op's nibble order
    s32 = s.float()
    sz = torch.stack([s32, (8 - z.float()) * s32], dim=-1)  # [N, K/G, 2]: w = (q - 8) * s + (8 - z) * s
    return CpuQuantLinear("int4", w, sz.transpose(0, 1).contiguous().to(dtype), group_size)


def release_freed_memory() -> None:
    """Hand the heap pages freed by a preparation back to the OS (glibc malloc_trim; elsewhere a no-op).
    Repacking int4 makes [N, K] int32 temporaries per projection; glibc keeps such freed blocks in
    the heap, so without this the resident set of a prepared model grows by several times its size."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


class CpuQuantPool:
    """A QuantPool's experts prepared once for the CPU ops; `ffn(slot, x)` runs one expert, choosing the
    weight-only ops or dequantize-then-matmul by token count (FAST_MAX_TOKENS)."""

    def __init__(self, pool: QuantPool, dtype: torch.dtype, max_tokens: int | None = None):
        if pool.device.type != "cpu":
            raise ValueError(f"CpuQuantPool needs a pool on cpu, got {pool.device}")
        self.pool, self.dtype = pool, dtype
        self.max_tokens = FAST_MAX_TOKENS.get((pool.fmt, dtype), 0) if max_tokens is None else max_tokens
        self.w13 = [self._prepare(pool, slot, 13) for slot in range(pool.num_slots)]
        self.w2 = [self._prepare(pool, slot, 2) for slot in range(pool.num_slots)]
        if pool.fmt == "int4":
            release_freed_memory()

    def _prepare(self, pool: QuantPool, slot: int, which: int) -> CpuQuantLinear | None:
        q, s, z = (pool.qw13, pool.s13, pool.z13) if which == 13 else (pool.qw2, pool.s2, pool.z2)
        if pool.fmt == "int8":
            return int8_linear(q[slot], s[slot], self.dtype)
        k = pool.hidden if which == 13 else pool.inter
        return int4_linear(q[slot], s[slot], z[slot], k, pool.group_size, self.dtype)

    @property
    def extra_bytes(self) -> int:
        """Host RAM this preparation holds beyond the packed rows."""
        return sum(p.extra_bytes for p in self.w13 + self.w2 if p is not None)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert on x [n, H] -> [n, H]."""
        w13, w2 = self.w13[slot], self.w2[slot]
        if x.shape[0] > self.max_tokens or x.dtype != self.dtype or w13 is None or w2 is None:
            return expert_ffn(x, *self.pool.dequant(slot, x.dtype))
        gate, up = w13(x).chunk(2, dim=-1)  # [n, I] each
        return w2(F.silu(gate) * up)  # [n, H]
