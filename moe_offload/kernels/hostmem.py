"""Host allocations for weights: transparent huge pages.

Decode streams every weight byte once per token. With 4 KiB pages a stream crosses a page every 4 KiB,
and each crossing costs a TLB miss and stalls the hardware prefetcher; 2 MiB pages remove both (the bf16
decode kernel over a 7168 x 1024 projection, weights out of cache, 2 threads: 14.2 -> 17.5 GB/s on the
2-core reference machine). Linux backs private anonymous memory with huge pages only where asked
(/sys/kernel/mm/transparent_hugepage/enabled is "madvise" on most distributions), so weight buffers are
advised (madvise MADV_HUGEPAGE) before their first touch. Elsewhere, or where the kernel declines,
nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


def empty(shape: tuple[int, ...] | int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """torch.empty, with huge pages advised for a large CPU tensor (see the module docstring)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for huge pages over the whole 2 MiB pages inside t's memory (before it is first written, so
    those pages fault in huge); True when the kernel accepted. CPU tensors of at least two huge pages."""
    if t.device.type != "cpu" or t.nbytes < 2 * HUGE_PAGE:
        return False
    libc = _libc()
    if libc is None:
        return False
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    return end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


MADV_DONTNEED = 4
PAGE = 4096


def drop_file_pages(t: torch.Tensor) -> bool:
    """Unmap from this process the whole pages inside t's memory (madvise MADV_DONTNEED), so they leave
    its resident set; the next read faults them back in from the page cache or the file. Only for a
    tensor over a read-only file mapping (a GGUF file's memory map): on anonymous memory it would zero the
    pages. True when the kernel accepted."""
    if t.device.type != "cpu" or t.nbytes < PAGE:
        return False
    libc = _libc()
    if libc is None:
        return False
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.nbytes) // PAGE * PAGE
    return end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _LIBC = lib
            except (OSError, AttributeError):
                pass
    return _LIBC or None
