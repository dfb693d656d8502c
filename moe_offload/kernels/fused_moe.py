"""Fused MoE grouped GEMM in Triton, reading experts straight out of a slot pool.

Two launches plus a reduction, whatever the token count:
  GEMM1  act[a] = silu(x[t] @ w1[s]^T) * (x[t] @ w3[s]^T)      for every assignment a = t*k + j
  GEMM2  y[a]   = (act[a] @ w2[s]^T) * topk_weight[a]
  sum    out[t] = sum_j y[t*k + j]                              (a torch sum over k: deterministic)
where s = slot_of_expert[expert of a]. Rows are processed in blocks of BLOCK_M assignments that all
belong to one expert (see align.py); the same compiled kernel serves any residency state. The weight
format (float, int8, int4; pool.py) is a compile-time flag, WEIGHT_FORMAT: one kernel pair, one variant
per format, differing only in how a weight tile is loaded (`_weight_tile`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from .align import moe_align_block_size
from .configs import TileConfig, tile_config
from .pool import WEIGHT_FLOAT, WeightPool, as_pool

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _block_rows(block_expert_ptr, slot_ptr, sorted_ids_ptr, num_assignments, BLOCK_M: tl.constexpr):
    """This program's row block: its expert (-1: past the end), that expert's slot, and the block's
    assignment indices with the mask of real (non-padding) rows."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    slot = tl.load(slot_ptr + tl.maximum(expert, 0)).to(tl.int64)
    assign = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]; N marks padding
    return expert, slot, assign, assign < num_assignments


@triton.jit
def _weight_tile(w_base, s_base, z_base, kk, cols, mask, stride_wn, stride_wk, stride_sn, stride_sg,
                 WEIGHT_FORMAT: tl.constexpr, GROUP: tl.constexpr):
    """[BK, BN] weight tile w[cols, kk]^T of one slot (kk: [BK] input indices, cols: [BN] output rows).
    WEIGHT_FLOAT: as stored. WEIGHT_INT8: q * s[n]. WEIGHT_INT4: (nibble(q[n, k // 2], k % 2) - z[n, k // G])
    * s[n, k // G], low nibble = even k. Quantized tiles come back in float32; the scale/zero tile is
    gathered per (k, n), so any BLOCK_K works with any group size."""
    if WEIGHT_FORMAT == 2:  # WEIGHT_INT4
        byte = tl.load(w_base + cols[None, :] * stride_wn + (kk // 2)[:, None] * stride_wk,
                       mask=mask, other=0).to(tl.int32)  # [BK, BN] packed pairs
        q = ((byte >> ((kk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
        g_off = cols[None, :] * stride_sn + (kk // GROUP)[:, None] * stride_sg  # [BK, BN]
        s = tl.load(s_base + g_off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_base + g_off, mask=mask, other=0.0).to(tl.float32)
        return (q - z) * s
    elif WEIGHT_FORMAT == 1:  # WEIGHT_INT8
        q = tl.load(w_base + cols[None, :] * stride_wn + kk[:, None] * stride_wk, mask=mask, other=0)
        s = tl.load(s_base + cols[None, :] * stride_sn + kk[:, None] * 0, mask=mask, other=0.0)  # [BK, BN]
        return q.to(tl.float32) * s.to(tl.float32)
    else:  # WEIGHT_FLOAT
        return tl.load(w_base + kk[:, None] * stride_wk + cols[None, :] * stride_wn, mask=mask, other=0.0)


@triton.jit
def _gemm1_silu_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr, slot_ptr,
    num_assignments, hidden, inter, top_k,
    stride_xt, stride_xh, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_sg,
    stride_aa, stride_ai,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, GROUP: tl.constexpr,
):
    expert, slot, assign, row_ok = _block_rows(block_expert_ptr, slot_ptr, sorted_ids_ptr, num_assignments, BLOCK_M)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    token = (assign // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    w_base, s_base, z_base = w_ptr + slot * stride_ws, s_ptr + slot * stride_ss, z_ptr + slot * stride_ss
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < hidden
        a = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = _weight_tile(w_base, s_base, z_base, kk, cols, w_mask, stride_wn, stride_wk, stride_sn, stride_sg,
                          WEIGHT_FORMAT, GROUP).to(x_ptr.dtype.element_ty)  # [BK, BN] = w1^T tile
        wu = _weight_tile(w_base, s_base, z_base, kk, cols + inter, w_mask, stride_wn, stride_wk, stride_sn,
                          stride_sg, WEIGHT_FORMAT, GROUP).to(x_ptr.dtype.element_ty)  # [BK, BN] = w3^T tile
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_gate = tl.dot(a, wg, acc_gate)
        acc_up = tl.dot(a, wu, acc_up)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, in float32
    tl.store(act_ptr + assign.to(tl.int64)[:, None] * stride_aa + cols[None, :] * stride_ai,
             act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm2_weighted_kernel(
    act_ptr, w_ptr, s_ptr, z_ptr, y_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, slot_ptr,
    num_assignments, hidden, inter,
    stride_aa, stride_ai, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_sg,
    stride_ya, stride_yh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, GROUP: tl.constexpr,
):
    expert, slot, assign, row_ok = _block_rows(block_expert_ptr, slot_ptr, sorted_ids_ptr, num_assignments, BLOCK_M)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    assign64 = assign.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    w_base, s_base, z_base = w_ptr + slot * stride_ws, s_ptr + slot * stride_ss, z_ptr + slot * stride_ss
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < inter
        a = tl.load(act_ptr + assign64[:, None] * stride_aa + kk[None, :] * stride_ai,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = _weight_tile(w_base, s_base, z_base, kk, cols, k_ok[:, None] & col_ok[None, :], stride_wn, stride_wk,
                         stride_sn, stride_sg, WEIGHT_FORMAT, GROUP).to(act_ptr.dtype.element_ty)  # [BK, BN] = w2^T
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc)
    rw = tl.load(weights_ptr + assign64, mask=row_ok, other=0.0)  # [BM] routing weights, float32
    acc = acc * rw[:, None]
    tl.store(y_ptr + assign64[:, None] * stride_ya + cols[None, :] * stride_yh,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def check_routing(name: str, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  slot_of_expert: torch.Tensor, *weights: torch.Tensor) -> None:
    """The checks every fused MoE entry point shares: routing shapes, the slot map, one device."""
    t = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {list(topk_ids.shape)} and topk_weights {list(topk_weights.shape)} "
                         f"must both be [T={t}, k]")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_of_expert must be a 1-D int tensor [E], got {slot_of_expert.dtype} "
                         f"{list(slot_of_expert.shape)}")
    devices = {x.device for x in (hidden, topk_ids, topk_weights, slot_of_expert, *weights)}
    if len(devices) != 1:
        raise ValueError(f"all {name} inputs must be on one device, got {sorted(map(str, devices))}")


def _check(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool: WeightPool,
           slot_of_expert: torch.Tensor) -> None:
    check_routing("fused_moe", hidden, topk_ids, topk_weights, slot_of_expert, pool.w13, pool.w2)
    h = hidden.shape[1]
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hidden must be float32/float16/bfloat16, got {hidden.dtype}")
    if pool.weight_format != WEIGHT_FLOAT:
        if pool.hidden != h:
            raise ValueError(f"quantized pool has hidden size {pool.hidden}, hidden is [T, {h}]")
        return
    w13_pool, w2_pool = pool.w13, pool.w2
    if w13_pool.dim() != 3 or w13_pool.shape[2] != h or w13_pool.shape[1] % 2:
        raise ValueError(f"w13_pool must be [S, 2I, H={h}], got {list(w13_pool.shape)}")
    s, two_i, _ = w13_pool.shape
    if w2_pool.shape != (s, h, two_i // 2):
        raise ValueError(f"w2_pool must be [S={s}, H={h}, I={two_i // 2}], got {list(w2_pool.shape)}")
    if hidden.dtype != w13_pool.dtype or hidden.dtype != w2_pool.dtype:
        raise ValueError(f"dtype mismatch: hidden {hidden.dtype}, w13_pool {w13_pool.dtype}, w2_pool {w2_pool.dtype}")


def check_resident(topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, num_slots: int) -> None:
    """Debug check (syncs the host): every routed expert has a slot in [0, num_slots)."""
    slots = slot_of_expert.long()[topk_ids.reshape(-1).long()]
    bad = (slots < 0) | (slots >= num_slots)
    if bool(bad.any()):
        experts = sorted(set(topk_ids.reshape(-1)[bad].tolist()))
        raise ValueError(f"fused_moe: tokens are routed to expert(s) {experts} that have no valid slot "
                         f"(slot_of_expert gives {sorted(set(slots[bad].tolist()))}; pool has {num_slots})")


def _weight_args(w: torch.Tensor, s: torch.Tensor | None, z: torch.Tensor | None) -> tuple[tuple, tuple]:
    """Pointers (weights, scales, zeros) and strides (slot, row, k; scale slot, row, group) of one
    projection. Missing scales / zeros pass another tensor of the call in their place (never read)."""
    s_ptr = w if s is None else s
    z_ptr = s_ptr if z is None else z
    ss, sn = (0, 0) if s is None else (s.stride(0), s.stride(1))
    sg = s.stride(2) if s is not None and s.dim() == 3 else 0
    return (w, s_ptr, z_ptr), (w.stride(0), w.stride(1), w.stride(2), ss, sn, sg)


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w13_pool: torch.Tensor | WeightPool, w2_pool: torch.Tensor | None, slot_of_expert: torch.Tensor, *,
              out: torch.Tensor | None = None, config: TileConfig | None = None,
              debug: bool = False) -> torch.Tensor:
    """Mixture-of-experts SwiGLU FFN in two Triton grouped-GEMM launches, any weight format.

    Args:
        hidden:         [T, H] float32 / float16 / bfloat16, the (normed) token activations.
        topk_ids:       [T, k] int32/int64 expert ids per token.
        topk_weights:   [T, k] routing weights (any float dtype; applied in float32).
        w13_pool:       either [S, 2I, H] slot pool (hidden's dtype) of gate (rows 0..I-1) and up (rows
                        I..2I-1) projections, or a WeightPool (pool.py: float, int8 or int4 views; its
                        weight_format picks the kernel's compile-time variant) with w2_pool None.
        w2_pool:        [S, H, I] slot pool of down projections, or None with a WeightPool.
        slot_of_expert: [E] int32/int64: the slot holding each expert (-1 if not resident).
        out:            optional [T, H] output of hidden's dtype, written in full.
        config:         tile config; default: nearest-M entry of the tile-config table.
        debug:          check (with a host sync) that every routed expert is resident, and fill the
                        intermediate buffers with NaN so that a row never written shows up.
    Returns:
        [T, H] in hidden's dtype: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]).
    Quantized weights are dequantized in registers (float32, then hidden's dtype), as the pool's torch
    reference does. Slots that no routed token uses are never read (NaN garbage there cannot leak).
    """
    pool = as_pool(w13_pool, w2_pool)
    _check(hidden, topk_ids, topk_weights, pool, slot_of_expert)
    inter = pool.inter
    run = MoeLaunch.prepare(hidden, topk_ids, topk_weights, slot_of_expert, inter, pool.num_slots, out,
                            config, debug)
    if run.empty:
        return run.out
    h, cfg, al = hidden.shape[1], run.cfg, run.al
    launch = dict(run.launch, WEIGHT_FORMAT=pool.weight_format, GROUP=pool.group_size)
    p13, st13 = _weight_args(pool.w13, pool.s13, pool.z13)
    _gemm1_silu_kernel[(run.num_blocks, triton.cdiv(inter, cfg.block_n))](
        hidden, *p13, run.act, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter, run.k,
        hidden.stride(0), hidden.stride(1), *st13, run.act.stride(0), run.act.stride(1), **launch)
    p2, st2 = _weight_args(pool.w2, pool.s2, pool.z2)
    _gemm2_weighted_kernel[(run.num_blocks, triton.cdiv(h, cfg.block_n))](
        run.act, *p2, run.y, run.weights, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter,
        run.act.stride(0), run.act.stride(1), *st2, run.y.stride(0), run.y.stride(1), **launch)
    return run.reduce()


def fused_moe_quant(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool: WeightPool,
                    slot_of_expert: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """fused_moe over a WeightPool (int8 / int4 / float views): fused_moe(hidden, ids, weights, pool, None,
    slot_of_expert, **kwargs). hidden [T, H] float; ids/weights [T, k]; slot_of_expert [E] -> [T, H]."""
    return fused_moe(hidden, topk_ids, topk_weights, pool, None, slot_of_expert, **kwargs)


@dataclass
class MoeLaunch:
    """What both grouped-GEMM launches of one fused MoE call need:
    the aligned assignment blocks, the intermediate buffers act [N, I] and y [N, H], the routing
    weights [N] in float32 and the tile config as launch keywords."""

    out: torch.Tensor
    empty: bool
    k: int = 0
    cfg: TileConfig | None = None
    al: Any = None
    n: int = 0
    act: torch.Tensor | None = None
    y: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    num_blocks: int = 0
    launch: dict = field(default_factory=dict)

    @classmethod
    def prepare(cls, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                slot_of_expert: torch.Tensor, inter: int, num_slots: int, out: torch.Tensor | None,
                config: TileConfig | None, debug: bool) -> "MoeLaunch":
        t, h = hidden.shape
        out = torch.empty_like(hidden) if out is None else out
        if t == 0:
            return cls(out.zero_(), True)
        if debug:
            check_resident(topk_ids, slot_of_expert, num_slots)
        cfg = config or tile_config(t, hidden.device)
        al = moe_align_block_size(topk_ids, slot_of_expert.shape[0], cfg.block_m)
        n = al.num_assignments
        alloc = torch.full if debug else (lambda shape, _v, **kw: torch.empty(shape, **kw))
        act = alloc((n, inter), float("nan"), dtype=hidden.dtype, device=hidden.device)  # [N, I]
        y = alloc((n, h), float("nan"), dtype=hidden.dtype, device=hidden.device)  # [N, H]
        upcast = _INTERPRET and hidden.dtype == torch.bfloat16  # interpreter bf16 tl.dot is wrong
        launch = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=upcast,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return cls(out, False, topk_ids.shape[1], cfg, al, n, act, y,
                   topk_weights.reshape(-1).to(torch.float32).contiguous(),  # [N]
                   slot_of_expert.contiguous(), al.block_expert.numel(), launch)

    def reduce(self) -> torch.Tensor:
        """out [T, H] = the sum over each token's k weighted expert rows (a deterministic torch sum)."""
        t, h = self.out.shape
        return torch.sum(self.y.view(t, self.k, h), dim=1, out=self.out)
