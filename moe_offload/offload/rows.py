"""An expert's host bytes in pieces: a memory-mapped GGUF file keeps an expert's gate, up and down runs
in three tensors, so its row is three contiguous pieces of the map, copied back to back into one slot
row (never gathered into a host buffer first). The copy engines take a Segments wherever they take a
host row tensor (numel() * element_size() is its byte count)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class Segments:
    """Contiguous uint8 host tensors whose concatenation is one expert row."""

    __slots__ = ("parts", "starts", "nbytes")

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [p.reshape(-1) for p in parts]  # contiguous views: reshape never copies them
        self.starts, n = [], 0
        for p in self.parts:
            self.starts.append(n)
            n += p.numel()
        self.nbytes = n

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1

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
