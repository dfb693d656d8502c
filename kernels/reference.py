"""Torch references for fused_moe: a per-expert loop (the oracle) and torch._grouped_mm (fast CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w13_pool: torch.Tensor, w2_pool: torch.Tensor, slot_of_expert: torch.Tensor
                        ) -> torch.Tensor:
    """Same contract as fused_moe; a plain loop over experts in ascending id (shapes as there)."""
    from ..model.moe import moe_loop

    return moe_loop(hidden, topk_ids.long(), topk_weights.float(), w13_pool, w2_pool,
                    slot_of_expert.tolist())


def grouped_mm_supported(hidden: torch.Tensor, w13_pool: torch.Tensor) -> bool:
    """torch._grouped_mm exists and the row strides it needs are multiples of 16 bytes."""
    from ..model.backends import grouped_mm_aligned

    return hasattr(torch, "_grouped_mm") and grouped_mm_aligned(hidden.shape[-1], w13_pool.shape[1] // 2,
                                                                  hidden.element_size())


def fused_moe_grouped_mm(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         w13_pool: torch.Tensor, w2_pool: torch.Tensor, slot_of_expert: torch.Tensor
                         ) -> torch.Tensor:
    """Same contract as fused_moe via torch._grouped_mm: sort assignments by expert, one grouped GEMM
    per projection. Gathers the routed experts' weights when the slot table is not the identity."""
    if not grouped_mm_supported(hidden, w13_pool):
        raise ValueError(f"torch._grouped_mm cannot run here (torch {torch.__version__}, hidden "
                         f"{list(hidden.shape)} {hidden.dtype}): it needs 16-byte-aligned rows; "
                         "use the loop or triton backend")
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e = slot_of_expert.shape[0]
    flat = topk_ids.reshape(-1).long()  # [N]
    order = torch.argsort(flat, stable=True)  # [N]
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)  # [E] group ends
    x = hidden[order // k]  # [N, H] grouped by expert
    slots = slot_of_expert.long().clamp_min(0)  # non-resident experts have no rows; any slot will do
    w13 = w13_pool.index_select(0, slots)  # [E, 2I, H]
    w2 = w2_pool.index_select(0, slots)  # [E, H, I]
    gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)  # [N, H]
    y = (y * topk_weights.reshape(-1)[order, None].float()).to(hidden.dtype)
    out = torch.zeros(t * k, h, dtype=hidden.dtype, device=hidden.device)
    out[order] = y  # back to assignment order t * k + j
    return out.view(t, k, h).sum(1)
