"""Page-cache residency of memory-mapped expert rows, as the OS reports it.

A memory-mapped store (a GGUF file, or a safetensors checkpoint read in place) has no host copy of its
experts: the OS page cache is the host tier, and a row whose pages are not in it is read from disk when
it is copied. `PageCacheProbe.check(row)` asks the OS, with mincore(2) on the row's page range only (no byte of the row is read, so nothing is faulted
in and no result can change), how many of the row's bytes are not resident. Linux only (ctypes on the C
library); elsewhere the probe's `method` is "unknown" and it reports nothing rather than guessing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Callable

import torch

from .rows import Segments

PAGE_SIZE = mmap.PAGESIZE
_BIT0 = bytes(b & 1 for b in range(256))  # mincore's vector: bit 0 of each byte is the page's residency


def _load_mincore() -> Callable[[int, int, int], int] | None:
    """libc's mincore(addr, length, vec) on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_MINCORE = _load_mincore()


def missing_bytes(addr: int, n: int) -> int | None:
    """Bytes of [addr, addr + n) on pages that are not resident (mincore: the page cache, for a file
    mapping); None when the OS cannot tell (no mincore, or the range is not mapped)."""
    if n <= 0:
        return 0
    if _MINCORE is None:
        return None
    start = addr - addr % PAGE_SIZE
    span = addr + n - start
    pages = -(-span // PAGE_SIZE)
    vec = (ctypes.c_ubyte * pages)()
    if _MINCORE(start, span, ctypes.addressof(vec)) != 0:
        return None
    resident = bytes(vec).translate(_BIT0)  # one byte per page: 1 resident, 0 not (the other bits are reserved)
    absent = resident.count(0)
    if absent == 0:
        return 0
    miss = absent * PAGE_SIZE
    if not resident[0]:  # the first page holds only the bytes from addr on
        miss -= addr - start
    if not resident[-1]:  # the last one only those before addr + n
        miss -= pages * PAGE_SIZE - span
    return miss


def row_missing_bytes(row: torch.Tensor | Segments) -> tuple[int, int] | None:
    """(bytes checked, bytes not resident) of one host row: a tensor, or a memory-mapped file's pieces
    (rows.Segments); None when the OS cannot tell for any of them."""
    parts = row.parts if isinstance(row, Segments) else [row]
    checked = miss = 0
    for p in parts:
        n = p.numel() * p.element_size()
        m = missing_bytes(p.data_ptr(), n)
        if m is None:
            return None
        checked += n
        miss += m
    return checked, miss


class PageCacheProbe:
    """Counts page-cache misses of a memory-mapped store's rows. `method`: "mincore" (Linux) or
    "unknown" (no way to ask the OS here: `check` returns None)."""

    def __init__(self) -> None:
        self.method = "mincore" if _MINCORE is not None else "unknown"

    def check(self, row: torch.Tensor | Segments) -> tuple[int, int] | None:
        """(bytes checked, bytes not in the page cache) of `row` now, or None when unknown."""
        if _MINCORE is None:
            return None
        try:
            return row_missing_bytes(row)
        except Exception:  # never let a statistic break a load
            return None
