"""Weight buffers ask Linux for transparent huge pages before their first touch (moe_offload/hostmem.py)."""

from pathlib import Path

import pytest
import torch

from moe_offload import hostmem

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_bytes() -> int:
    """This process's AnonHugePages (/proc/self/smaps_rollup)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_large_weight_buffer_is_backed_by_huge_pages_and_a_plain_one_is_not():
    before = anon_huge_bytes()
    t = hostmem.empty((64 << 20,), torch.uint8)
    t.fill_(1)  # first touch: the advised range faults in huge pages
    got = anon_huge_bytes() - before
    assert got >= 60 << 20, got  # all but the unaligned ends
    if "[madvise]" in THP.read_text():  # without the advice: 4 KiB pages
        plain = torch.empty(64 << 20, dtype=torch.uint8)
        plain.fill_(1)
        assert anon_huge_bytes() - before == got


def test_small_tensors_are_left_alone():
    assert not hostmem.advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # under two huge pages
    assert hostmem.empty((3, 4), torch.float32).shape == (3, 4)
