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


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_buffer_asked_for_after_large_frees_is_still_fresh_and_aligned():
    """glibc's mmap threshold rises as large blocks are freed, after which torch.empty of tens of MB
    comes from memory already touched in 4 KiB pages, where advice comes too late: hostmem.empty maps
    its own, starting on a huge page (a fresh mapping's first whole huge page is eligible)."""
    for _ in range(3):
        big = torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
        del big  # freed: the threshold rises past 24 MB
    t = hostmem.empty((20 << 20,), torch.uint8)
    assert t.data_ptr() % hostmem.HUGE_PAGE == 0
    assert vma_field(t.data_ptr(), "THPeligible") == 1
    t.fill_(3)
    assert int(t.sum()) == 3 * t.numel()


def test_an_arena_hands_out_aligned_tensors_and_overflows_into_their_own():
    a = hostmem.Arena(3 << 20)
    x, y = a.empty((1000,), torch.uint8), a.empty((5, 7), torch.float16)
    assert y.data_ptr() % 64 == 0 and y.data_ptr() >= x.data_ptr() + 1000 and y.is_contiguous()
    x.fill_(1), y.fill_(2)
    assert int(x.sum()) == 1000 and float(y.sum()) == 70  # no overlap
    z = a.empty((4 << 20,), torch.uint8)  # more than is left
    assert z.numel() == 4 << 20 and a.extra == 4 << 20 and a.bytes_used == a.used + (4 << 20)


def test_small_tensors_are_left_alone():
    assert not hostmem.advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # under one huge page
    assert hostmem.empty((3, 4), torch.float32).shape == (3, 4)
