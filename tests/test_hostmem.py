"""Weight buffers ask Linux for transparent huge pages before their first touch (moe_offload/kernels/hostmem.py)."""

from pathlib import Path

import pytest
import torch

from moe_offload.kernels import hostmem

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vma_field(addr: int, field: str) -> int | None:
    """Field `field` (e.g. THPeligible) of the mapping holding address `addr` (/proc/self/smaps)."""
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            found = lo <= addr < hi
        elif found and head == field + ":":
            return int(line.split()[1])
    return None


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_large_weight_buffer_may_use_huge_pages():
    """The advised range (whole 2 MiB pages inside the tensor) is eligible for huge pages; whether the
    kernel finds free ones when they fault in is up to its memory, so eligibility is what is checked."""
    t = hostmem.empty((64 << 20,), torch.uint8)
    inside = -(-t.data_ptr() // hostmem.HUGE_PAGE) * hostmem.HUGE_PAGE  # first whole huge page
    assert vma_field(inside, "THPeligible") == 1
    # (a plain allocation's eligibility is not checked: in a long process the allocator may hand back
    # memory that an earlier advice already covers)


def test_small_tensors_are_left_alone():
    assert not hostmem.advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # under two huge pages
    assert hostmem.empty((3, 4), torch.float32).shape == (3, 4)
