"""Packed experts on the CPU through a weight-only op where the format has one (PyTorch's own
int8 / int4 kernels; each format prepares its projections: WeightPool.cpu_linear), else the torch
reference, dequantize-then-matmul.

Which path runs is chosen per expert call by token count: the weight-only ops win at decode;
dequantize-then-matmul (one F.linear on the whole batch) wins once enough tokens share an expert.
The crossover is the format's, per compute dtype (WeightPool.cpu_max_tokens). The pool's packed rows
are never changed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .pool import WeightPool


@dataclass
class CpuLinear:
    """One projection [N, K] ready for a weight-only CPU op: y [M, N] = op(x [M, K], weight, scales).
    `repacked`: `weight` is a copy made for the op (it counts as extra RAM), not the pool's bytes;
    `own_scales`: `scales` were made for the op (extra RAM) rather than read from the pool in place."""

    op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    scales: torch.Tensor
    repacked: bool = False
    own_scales: bool = True

    def __post_init__(self) -> None:
        if self.weight.device.type != "cpu":
            raise ValueError(f"CpuLinear weight is on {self.weight.device}, the ops run on cpu only")

    @property
    def extra_bytes(self) -> int:
        """Bytes held beyond the packed row (a repacked weight; the scales in the compute dtype)."""
        return (self.weight.nbytes if self.repacked else 0) + (self.scales.nbytes if self.own_scales else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        return self.op(x, self.weight, self.scales)


def release_freed_memory() -> None:
    """Hand the heap pages freed by a preparation back to the OS (glibc malloc_trim; elsewhere a no-op).
    Repacking makes [N, K] int32 temporaries per projection; glibc keeps such freed blocks in the
    heap, so without this the resident set of a prepared model grows by several times its size."""
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
    """A pool's experts prepared once for the CPU ops; `ffn(slot, x)` runs one expert, choosing the
    weight-only ops or dequantize-then-matmul by token count (at most `max_tokens`: the ops)."""

    def __init__(self, pool: WeightPool, dtype: torch.dtype, max_tokens: int | None = None):
        if pool.device.type != "cpu":
            raise ValueError(f"CpuQuantPool needs a pool on cpu, got {pool.device}")
        self.pool, self.dtype = pool, dtype
        self.max_tokens = pool.cpu_max_tokens(dtype) if max_tokens is None else max_tokens
        self.w13 = [pool.cpu_linear("w13", slot, dtype) for slot in range(pool.num_slots)]
        self.w2 = [pool.cpu_linear("w2", slot, dtype) for slot in range(pool.num_slots)]
        if any(p is not None and p.repacked for p in self.w13 + self.w2):
            release_freed_memory()

    @property
    def extra_bytes(self) -> int:
        """Host RAM this preparation holds beyond the packed rows."""
        return sum(p.extra_bytes for p in self.w13 + self.w2 if p is not None)

    def a8_expert(self, slot: int, x: torch.Tensor):
        """The pool's expert as 8-bit activation projections (WeightPool.a8_expert) where ffn would run
        the weight-only ops on x."""
        if x.shape[0] > self.max_tokens or x.dtype != self.dtype or self.w13[slot] is None or self.w2[slot] is None:
            return None
        return self.pool.a8_projections(slot, x)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert on x [n, H] -> [n, H]."""
        w13, w2 = self.w13[slot], self.w2[slot]
        if x.shape[0] > self.max_tokens or x.dtype != self.dtype or w13 is None or w2 is None:
            return self.pool.ffn(slot, x)  # dequantize a tile of rows at a time, then matmul
        gate, up = w13(x).chunk(2, dim=-1)  # [n, I] each
        return w2(F.silu(gate) * up)  # [n, H]
