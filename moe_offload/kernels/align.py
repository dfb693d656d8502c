"""Token alignment for grouped GEMM: sort (token, k) assignments by expert, pad groups to BLOCK_M.

Runs in torch on any device with no host sync: buffers are sized for the worst case
(every expert's group padded by BLOCK_M - 1) and blocks past the real end get expert id -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alignment:
    """sorted_ids [P]: flat assignment index (t * k + j) per padded row, N marks padding.
    block_expert [P // BLOCK_M]: expert of each row block, -1 past the last real block."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_assignments: int  # N = T * k


def max_padded_rows(num_assignments: int, num_experts: int, block_m: int) -> int:
    rows = num_assignments + num_experts * (block_m - 1)
    return (rows + block_m - 1) // block_m * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """topk_ids [T, k] (int) -> Alignment with every expert's group padded to a multiple of block_m."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N]
    n = flat.numel()
    # scatter-add, not bincount: bincount on CUDA reads its input's max back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    count_start = torch.cumsum(counts, 0) - counts  # [E]
    order = torch.argsort(flat, stable=True)  # [N] assignment indices grouped by expert
    experts_sorted = flat[order]  # [N]
    rank = torch.arange(n, device=flat.device) - count_start[experts_sorted]  # [N] rank within group
    dest = padded_start[experts_sorted] + rank  # [N] padded row of each assignment
    rows = max_padded_rows(n, num_experts, block_m)
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=flat.device)  # [P]
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=flat.device)  # [P / BM]
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # [P / BM] in 0..E
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return Alignment(sorted_ids, block_expert, block_m, n)
