"""An expert's host bytes in pieces: a memory-mapped file keeps an expert's sections in separate tensors
(a GGUF file its gate, up and down runs; a safetensors file each tensor the format's row holds, e.g.
w1, w3, w2, or a GPTQ matrix's qweight, scales, ...), so its row is contiguous pieces of the map, copied
back to back into one slot row (never gathered into a host buffer first). The copy engines take a
Segments wherever they take a host row tensor (numel() * element_size() is its byte count).

A layer's section whose experts are separate tensors of the file (one per expert, not one [E, ...]
tensor) is a Stacked: indexed like a tensor [E, *shape] (st[e] one expert's tensor, st[a:b] a Stacked),
so a format's pool built over the file's tensors reads it as it reads a slice of a pool."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class Segments:
    """Contiguous host tensors whose bytes, concatenated, are one expert row (held as uint8 views)."""

    __slots__ = ("parts", "starts", "nbytes")

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [row_bytes(p) for p in parts]  # contiguous: views of the same memory, never copies
        self.starts, n = [], 0
        for p in self.parts:
            self.starts.append(n)
            n += p.numel()
        self.nbytes = n

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1

    def __getitem__(self, index: slice) -> torch.Tensor:
        """Row bytes [start, stop) as uint8: a view when they lie inside one piece, else a copy gathered
        from the pieces (for checks and tests; the copy engines read pieces())."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a Segments row is indexed by a byte range [start:stop]")
        lo, hi, _ = index.indices(self.nbytes)
        got = list(self.pieces(lo, max(hi - lo, 0)))
        if len(got) == 1:
            return got[0][1]
        out = torch.empty(max(hi - lo, 0), dtype=torch.uint8)
        for off, part in got:
            out[off - lo: off - lo + part.numel()].copy_(part)
        return out

    def pieces(self, lo: int, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset in the row, bytes) of every piece of row bytes [lo, lo + n)."""
        hi = lo + n
        for start, part in zip(self.starts, self.parts):
            a, b = max(lo, start), min(hi, start + part.numel())
            if a < b:
                yield a, part[a - start: b - start]


def row_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as its uint8 bytes (a view)."""
    return t.reshape(-1).view(torch.uint8)


class Stacked:
    """Same-shaped tensors, one per expert, indexed like one tensor [E, *shape] without stacking them:
    st[e] is expert e's tensor itself, st[a:b] a Stacked of those experts; shape, dtype and device as a
    stacked tensor would have them. (A safetensors file's experts are separate tensors at no regular
    stride, so no strided view of the file can hold them.)"""

    __slots__ = ("items", "shape", "dtype", "device")

    def __init__(self, items: list[torch.Tensor]):
        if not items:
            raise ValueError("Stacked needs at least one tensor")
        first = items[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in items):
            raise ValueError("Stacked tensors must share one shape and dtype")
        self.items = list(items)
        self.shape = torch.Size((len(items), *first.shape))
        self.dtype, self.device = first.dtype, first.device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | slice) -> "torch.Tensor | Stacked":
        if isinstance(index, slice):
            return Stacked(self.items[index])
        return self.items[index]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.items[0].element_size()


def copy_row(dst: torch.Tensor, src: torch.Tensor | Segments, non_blocking: bool = False) -> None:
    """One expert row (a tensor or Segments) into dst, a device or host row at least as long."""
    if isinstance(src, Segments):
        d = row_bytes(dst)
        for off, part in src.pieces(0, src.nbytes):
            d[off: off + part.numel()].copy_(part, non_blocking=non_blocking)
    else:
        dst[: src.numel()].copy_(src, non_blocking=non_blocking)


def host_copy_bytes(dst: torch.Tensor, src: torch.Tensor | Segments, lo: int, n: int) -> None:
    """Row bytes [lo, lo + n) of src into the host row dst, through numpy (a plain memcpy that releases
    the GIL and uses no OpenMP threads)."""
    d = row_bytes(dst).numpy()
    if isinstance(src, Segments):
        for off, part in src.pieces(lo, n):
            np.copyto(d[off: off + part.numel()], part.numpy())
    else:
        np.copyto(d[lo: lo + n], row_bytes(src).numpy()[lo: lo + n])
