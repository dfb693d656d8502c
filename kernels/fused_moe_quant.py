"""Fused MoE grouped GEMMs over a quantized slot pool (QuantPool, int8 or int4), dequantizing in-kernel.

Same two launches and contract as fused_moe.py; the weight tile [BK, BN] is built from the packed
pool each K step: int8 w = q * s[n]; int4 w = (nibble(q[n, k // 2], k % 2) - z[n, k // G]) * s[n, k // G]
(low nibble = even k), in float32, then cast to the activation dtype (as QuantPool.dequant does) and
accumulated in float32. The scale/zero tile is gathered per (k, n), so any BLOCK_K works with any G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import TileConfig
from .fused_moe import MoeLaunch, _block_rows, check_routing
from .quant import QuantPool


@triton.jit
def _dequant_tile(q_base, s_base, z_base, kk, cols, mask, stride_qn, stride_qk, stride_sn, stride_sg,
                  GROUP: tl.constexpr, IS_INT4: tl.constexpr):
    """[BK, BN] float32 weight tile w[cols, kk]^T of one slot (kk: [BK] input indices, cols: [BN])."""
    if IS_INT4:
        byte = tl.load(q_base + cols[None, :] * stride_qn + (kk // 2)[:, None] * stride_qk,
                       mask=mask, other=0).to(tl.int32)  # [BK, BN] packed pairs
        q = ((byte >> ((kk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
        g_off = cols[None, :] * stride_sn + (kk // GROUP)[:, None] * stride_sg  # [BK, BN]
        s = tl.load(s_base + g_off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_base + g_off, mask=mask, other=0.0).to(tl.float32)
        return (q - z) * s
    else:
        q = tl.load(q_base + cols[None, :] * stride_qn + kk[:, None] * stride_qk, mask=mask, other=0)
        s = tl.load(s_base + cols[None, :] * stride_sn + kk[:, None] * 0, mask=mask, other=0.0)  # [BK, BN]
        return q.to(tl.float32) * s.to(tl.float32)


@triton.jit
def _qgemm1_silu_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr, slot_ptr,
    num_assignments, hidden, inter, top_k,
    stride_xt, stride_xh, stride_qs, stride_qn, stride_qk, stride_ss, stride_sn, stride_sg,
    stride_aa, stride_ai,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    GROUP: tl.constexpr, IS_INT4: tl.constexpr,
):
    expert, slot, assign, row_ok = _block_rows(block_expert_ptr, slot_ptr, sorted_ids_ptr, num_assignments, BLOCK_M)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    token = (assign // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    q_base, s_base, z_base = q_ptr + slot * stride_qs, s_ptr + slot * stride_ss, z_ptr + slot * stride_ss
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < hidden
        a = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = _dequant_tile(q_base, s_base, z_base, kk, cols, w_mask, stride_qn, stride_qk, stride_sn,
                           stride_sg, GROUP, IS_INT4).to(x_ptr.dtype.element_ty)  # [BK, BN] = w1^T
        wu = _dequant_tile(q_base, s_base, z_base, kk, cols + inter, w_mask, stride_qn, stride_qk, stride_sn,
                           stride_sg, GROUP, IS_INT4).to(x_ptr.dtype.element_ty)  # [BK, BN] = w3^T
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_gate = tl.dot(a, wg, acc_gate)
        acc_up = tl.dot(a, wu, acc_up)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, in float32
    tl.store(act_ptr + assign.to(tl.int64)[:, None] * stride_aa + cols[None, :] * stride_ai,
             act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _qgemm2_weighted_kernel(
    act_ptr, q_ptr, s_ptr, z_ptr, y_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, slot_ptr,
    num_assignments, hidden, inter,
    stride_aa, stride_ai, stride_qs, stride_qn, stride_qk, stride_ss, stride_sn, stride_sg,
    stride_ya, stride_yh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    GROUP: tl.constexpr, IS_INT4: tl.constexpr,
):
    expert, slot, assign, row_ok = _block_rows(block_expert_ptr, slot_ptr, sorted_ids_ptr, num_assignments, BLOCK_M)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    assign64 = assign.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    q_base, s_base, z_base = q_ptr + slot * stride_qs, s_ptr + slot * stride_ss, z_ptr + slot * stride_ss
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < inter
        a = tl.load(act_ptr + assign64[:, None] * stride_aa + kk[None, :] * stride_ai,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = _dequant_tile(q_base, s_base, z_base, kk, cols, k_ok[:, None] & col_ok[None, :], stride_qn, stride_qk,
                          stride_sn, stride_sg, GROUP, IS_INT4).to(act_ptr.dtype.element_ty)  # [BK, BN] = w2^T
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc)
    rw = tl.load(weights_ptr + assign64, mask=row_ok, other=0.0)  # [BM] routing weights, float32
    acc = acc * rw[:, None]
    tl.store(y_ptr + assign64[:, None] * stride_ya + cols[None, :] * stride_yh,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _pool_args(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, is_int4: bool) -> tuple:
    """Pointers and strides (slot, row, k / group) of one quantized weight; int8 passes s as z."""
    z = s if z is None else z
    sg = s.stride(2) if is_int4 else 0
    return (q, s, z), (q.stride(0), q.stride(1), q.stride(2), s.stride(0), s.stride(1), sg)


def _check(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool: QuantPool,
           slot_of_expert: torch.Tensor) -> None:
    check_routing("fused_moe_quant", hidden, topk_ids, topk_weights, slot_of_expert, pool.qw13)
    if pool.hidden != hidden.shape[1]:
        raise ValueError(f"quantized pool has hidden size {pool.hidden}, hidden is [T, {hidden.shape[1]}]")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hidden must be float32/float16/bfloat16, got {hidden.dtype}")


def fused_moe_quant(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool: QuantPool,
                    slot_of_expert: torch.Tensor, *, out: torch.Tensor | None = None,
                    config: TileConfig | None = None, debug: bool = False) -> torch.Tensor:
    """fused_moe (see fused_moe.py) with experts read from a packed int8/int4 QuantPool and dequantized
    in-kernel. hidden [T, H] float; ids/weights [T, k]; slot_of_expert [E]. Returns [T, H] in hidden's dtype."""
    _check(hidden, topk_ids, topk_weights, pool, slot_of_expert)
    inter = pool.inter
    run = MoeLaunch.prepare(hidden, topk_ids, topk_weights, slot_of_expert, inter, pool.num_slots, out, config,
                            debug)
    if run.empty:
        return run.out
    h, cfg, al = hidden.shape[1], run.cfg, run.al
    is_int4 = pool.fmt == "int4"
    launch = dict(run.launch, GROUP=pool.group_size if is_int4 else 1, IS_INT4=is_int4)
    p13, st13 = _pool_args(pool.qw13, pool.s13, pool.z13, is_int4)
    _qgemm1_silu_kernel[(run.num_blocks, triton.cdiv(inter, cfg.block_n))](
        hidden, *p13, run.act, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter, run.k,
        hidden.stride(0), hidden.stride(1), *st13, run.act.stride(0), run.act.stride(1), **launch)
    p2, st2 = _pool_args(pool.qw2, pool.s2, pool.z2, is_int4)
    _qgemm2_weighted_kernel[(run.num_blocks, triton.cdiv(h, cfg.block_n))](
        run.act, *p2, run.y, run.weights, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter,
        run.act.stride(0), run.act.stride(1), *st2, run.y.stride(0), run.y.stride(1), **launch)
    return run.reduce()
