"""Slot pools as the fused MoE kernel and the reference loop read them: per-slot views of one device
pool plus the WEIGHT_FORMAT value that selects, at compile time, how the kernel loads a weight tile.

  WEIGHT_FLOAT  w13 [S, 2I, H], w2 [S, H, I] in the activation dtype.
  WEIGHT_INT8   w13 int8 [S, 2I, H], s13 [S, 2I]; w2 int8 [S, H, I], s2 [S, H]. w = q * s[n] (symmetric,
                one scale per output row).
  WEIGHT_INT4   w13 uint8 [S, 2I, ceil(H/2)], s13 / z13 [S, 2I, ceil(H/G)]; w2 uint8 [S, H, ceil(I/2)],
                s2 / z2 [S, H, ceil(I/G)]. Weight k of a row is the low nibble of byte k // 2 when k is
                even, the high nibble when k is odd; w = (q - z) * s with the scale and zero of group k // G.
  WEIGHT_GGUF_*  GGUF (ggml) block types read as the file stores them (formats/gguf.py): w13 uint8
                [S, 2I, rb(H)] (gate rows, then up rows, one type), w2 uint8 [S, H, rb(I)] (rb: the type's
                row bytes); no scale / zero tensors, every block carries its own. GGUF_FLAGS maps the type
                names the kernel decodes (Q8_0, Q4_0, Q4_K, Q6_K, MXFP4) to their flags; the two
                projections may differ (kernel_format).
Scales and zeros are fp16; a quantized weight is dequantized in float32, then cast to the activation dtype.

Which format a pool holds is decided by the code that packs it (moe_offload.formats): a quantized
format subclasses WeightPool with its torch dequantization (the reference) and, optionally, its CPU
weight-only op. This module knows the formats only as the integers the kernel branches on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .reference import expert_ffn, linear

WEIGHT_FLOAT, WEIGHT_INT8, WEIGHT_INT4 = 0, 1, 2
# Output rows that WeightPool.ffn dequantizes at a time: a tile of Mixtral-734M's 7168 x 1024 projection is
# 1 MiB in bf16 (2 MiB as float32 on the way), where the whole projection was 42 MiB of temporaries per
# expert call; freed temporaries that size stayed in the heap (resident memory +45% after a 64-token
# prefill, benchmarks/cpu_vs_llamacpp.py's memory column).
DEQUANT_TILE_ROWS = 512
WEIGHT_GGUF_Q8_0, WEIGHT_GGUF_Q4_0, WEIGHT_GGUF_Q4_K, WEIGHT_GGUF_Q6_K, WEIGHT_GGUF_MXFP4 = 3, 4, 5, 6, 7
WEIGHT_NONE = -1  # a format no kernel variant reads: the loop backend only
GGUF_FLAGS = {"Q8_0": WEIGHT_GGUF_Q8_0, "Q4_0": WEIGHT_GGUF_Q4_0, "Q4_K": WEIGHT_GGUF_Q4_K, "Q6_K": WEIGHT_GGUF_Q6_K,
              "MXFP4": WEIGHT_GGUF_MXFP4}  # ggml block type name -> WEIGHT_FORMAT


@dataclass
class WeightPool(ABC):
    """Per-slot views of a slot pool (slot dimension first; see the module docstring). s* / z* are None
    where the format has no scales / zero points; group_size is 1 where it has no groups."""

    hidden: int
    inter: int
    w13: torch.Tensor
    w2: torch.Tensor
    s13: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    z13: torch.Tensor | None = None
    z2: torch.Tensor | None = None
    group_size: int = 1

    weight_format: ClassVar[int] = WEIGHT_FLOAT  # the kernel's WEIGHT_FORMAT constexpr, one per subclass

    @property
    def num_slots(self) -> int:
        return self.w13.shape[0]

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @property
    def extra_bytes(self) -> int:
        """Memory held beyond the pool's rows (none for views)."""
        return 0

    def projection(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """(weights, scales, zeros, K) of projection 'w13' (K = hidden) or 'w2' (K = inter)."""
        if which == "w13":
            return self.w13, self.s13, self.z13, self.hidden
        return self.w2, self.s2, self.z2, self.inter

    def a8_expert(self, slot: int, x: torch.Tensor) -> Any:
        """The expert in `slot` as (gate|up, down) cpu_gemv.A8Projection for one token x [1, H], when `ffn`
        itself would run both on the 8-bit activation kernels (then reference.moe_loop makes one compiled
        call of it); None otherwise."""
        return None

    def a8_projections(self, slot: int, x: torch.Tensor) -> Any:
        """The expert's projections for the 8-bit activation kernels (as a8_expert), for a wrapper that runs
        them (quant_cpu.CpuQuantPool); this pool's own `ffn` may compute otherwise. None where they do not run."""
        return None

    def kernel_format(self, which: str) -> int:
        """The fused kernel's WEIGHT_FORMAT for projection 'w13' or 'w2' (WEIGHT_NONE: no kernel reads
        it): weight_format for both, unless the format encodes the two differently."""
        return self.weight_format

    def kernel_refusal(self) -> str | None:
        """Why the fused kernel cannot read this pool (one line), or None when it can."""
        if WEIGHT_NONE in (self.kernel_format("w13"), self.kernel_format("w2")):
            return f"no fused-kernel weight format reads {type(self).__name__}: run it on moe_backend 'loop'"
        return None

    def kernel_views(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weights, scales, zeros) of projection 'w13' or 'w2' as the fused kernel reads them."""
        return self.projection(which)[:3]

    @abstractmethod
    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        """Projection `which` of `slot` as float weights [N, K] (float32 for quantized formats)."""

    def dequant(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert in `slot` as (w13 [2I, H], w2 [H, I]) in `dtype` (the torch reference)."""
        return self.dequant_projection("w13", slot).to(dtype), self.dequant_projection("w2", slot).to(dtype)

    def dequant_rows(self, which: str, slot: int, lo: int, hi: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows lo..hi-1 of projection `which` of `slot`, [hi - lo, K] in `dtype` (the float32 values
        cast; formats whose rows dequantize on their own override this, the default dequantizes the whole
        projection)."""
        return self.dequant_projection(which, slot)[lo:hi].to(dtype)

    def dequant_linear(self, which: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] @ W^T -> [n, N] for projection `which` of `slot`, dequantizing DEQUANT_TILE_ROWS output
        rows at a time (in x's dtype), so a call never holds a whole dequantized projection."""
        n = 2 * self.inter if which == "w13" else self.hidden  # output rows
        tiles = [linear(x, self.dequant_rows(which, slot, lo, min(lo + DEQUANT_TILE_ROWS, n), x.dtype))
                 for lo in range(0, n, DEQUANT_TILE_ROWS)]
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert on x [n, H] -> [n, H]: dequantize a tile of rows, then matmul (dequant_linear)."""
        gate, up = self.dequant_linear("w13", slot, x).chunk(2, dim=-1)  # [n, I] each
        return self.dequant_linear("w2", slot, F.silu(gate) * up)

    def as_views(self) -> tuple[Any, torch.Tensor | None]:
        """(w13, w2) as run_experts and moe_loop take them: (self, None)."""
        return self, None

    def in_ram(self, alloc: Any = None) -> "WeightPool | None":
        """This pool's experts copied into host RAM in the layout the CPU kernels read fastest, for a pool
        over a file's memory map that the CPU runs in place (offload.packed.PackedResidentExperts copies
        when the experts fit in RAM); `alloc(shape, dtype)` makes the tensors (default hostmem.empty: huge
        pages). None where the format keeps its views (the default)."""
        return None

    # Most tokens per expert for which the format's CPU op beats dequantize-then-matmul, per compute dtype
    # (absent: never; the format's own measurements).
    fast_max_tokens: ClassVar[dict[torch.dtype, int]] = {}

    def cpu_linear(self, which: str, slot: int, dtype: torch.dtype) -> Any:
        """Projection `which` ('w13' or 'w2') of `slot` prepared for a weight-only CPU op in `dtype`
        (a quant_cpu.CpuLinear), or None where the format has none for this shape."""
        return None

    def cpu_max_tokens(self, dtype: torch.dtype) -> int:
        """Most tokens per expert for which the CPU op runs instead of dequantize-then-matmul (0: never)."""
        return self.fast_max_tokens.get(dtype, 0)


@dataclass
class FloatPool(WeightPool):
    """A pool whose weights are stored in the activation dtype: w13 [S, 2I, H], w2 [S, H, I]."""

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        return self.projection(which)[0][slot]

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, self.w13[slot], self.w2[slot])

    def as_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float tensors themselves: every backend (grouped_mm too) reads them."""
        return self.w13, self.w2

    @classmethod
    def of(cls, w13: torch.Tensor, w2: torch.Tensor) -> "FloatPool":
        return cls(w13.shape[-1], w2.shape[-1], w13, w2)


@dataclass
class BiasedFloatPool(FloatPool):
    """A FloatPool whose experts also carry biases, b13 [S, 2I] and b2 [S, H], and run a gated activation
    of their own (`act`, e.g. reference.ClampedSwiGLU; None: SwiGLU): GPT-OSS's experts. The fused kernels
    and torch._grouped_mm have neither, so it runs on the loop backend only (loop_only)."""

    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    act: Any = None

    loop_only: ClassVar[bool] = True

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        b13 = None if self.b13 is None else self.b13[slot]
        b2 = None if self.b2 is None else self.b2[slot]
        return expert_ffn(x, self.w13[slot], self.w2[slot], b13, b2, self.act)

    def as_views(self) -> tuple[Any, None]:
        """(self, None): the loop calls ffn (biases and activation); a kernel backend refuses it."""
        return self, None


def as_pool(w13: torch.Tensor | WeightPool, w2: torch.Tensor | None) -> WeightPool:
    """The kernels' two calling conventions, as one pool: float tensors (w13, w2), or a pool and None."""
    if w2 is None:
        if not isinstance(w13, WeightPool):
            raise ValueError(f"w2_pool is None, so w13_pool must be a WeightPool, got {type(w13).__name__}")
        return w13
    return FloatPool.of(w13, w2)
