"""Fused MoE grouped GEMM in Triton, reading experts straight out of a slot pool.

Two launches plus a reduction, whatever the token count:
  GEMM1  act[a] = silu(x[t] @ w1[s]^T) * (x[t] @ w3[s]^T)      for every assignment a = t*k + j
  GEMM2  y[a]   = (act[a] @ w2[s]^T) * topk_weight[a]
  sum    out[t] = sum_j y[t*k + j]                              (a torch sum over k: deterministic)
where s = slot_of_expert[expert of a]. Rows are processed in blocks of BLOCK_M assignments that all
belong to one expert (see align.py); the same compiled kernel serves any residency state. The weight
format (float, int8, int4, and the GGUF block types Q8_0, Q4_0, Q4_K, Q6_K, MXFP4; pool.py) is a
compile-time flag, WEIGHT_FORMAT: one kernel pair, one variant per format, differing only in how a
weight tile is loaded (`_weight_tile`). GEMM1 and GEMM2 each take their projection's flag (a GGUF file
may store down in another type than gate/up).

GGUF tiles are decoded from the file's row bytes in registers (`_gguf_tile`): each weight (k, n) finds its
block (k // block size), loads its quant bits and its block's fp16 scale (two bytes, bitcast) or, for
K-quants, unpacks its sub-block's 6-bit scale / min, so any BLOCK_K works with any block size. The GGUF
variants are tested only under the Triton interpreter (TRITON_INTERPRET=1, fp32/fp16) until a GPU run
(benchmarks/gpu_check.py, section gguf_kernels) confirms them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from . import pool as _flags
from .align import moe_align_block_size
from .configs import TileConfig, tile_config
from .pool import WEIGHT_FLOAT, WeightPool, as_pool

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# pool.py's WEIGHT_FORMAT values as the jitted code reads globals: constexpr
WEIGHT_INT8 = tl.constexpr(_flags.WEIGHT_INT8)
WEIGHT_INT4 = tl.constexpr(_flags.WEIGHT_INT4)
WEIGHT_GGUF_Q8_0 = tl.constexpr(_flags.WEIGHT_GGUF_Q8_0)
WEIGHT_GGUF_Q4_0 = tl.constexpr(_flags.WEIGHT_GGUF_Q4_0)
WEIGHT_GGUF_Q4_K = tl.constexpr(_flags.WEIGHT_GGUF_Q4_K)
WEIGHT_GGUF_Q6_K = tl.constexpr(_flags.WEIGHT_GGUF_Q6_K)
WEIGHT_GGUF_MXFP4 = tl.constexpr(_flags.WEIGHT_GGUF_MXFP4)


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
def _byte(ptr, mask):
    """uint8 at ptr -> int32 (0..255); 0 where masked."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _fp16_at(ptr, mask):
    """The little-endian fp16 at byte pointer ptr (two bytes, assembled and bitcast) -> float32."""
    bits = _byte(ptr, mask) | (_byte(ptr + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(ptr, j, mask):
    """Weight j (0..31) of a 32-weight block whose 16 packed bytes start at ptr: low nibbles hold 0..15,
    high nibbles 16..31 (ggml's Q4_0 / MXFP4 order)."""
    return (_byte(ptr + j % 16, mask) >> ((j // 16) * 4)) & 0xF


@triton.jit
def _q8_0(row, k, mask):
    """Q8_0 (34-byte blocks of 32): fp16 d, then 32 int8 q; w = q * d."""
    blk = row + (k // 32) * 34
    q = (_byte(blk + 2 + k % 32, mask) ^ 0x80) - 0x80  # sign-extended int8
    return q.to(tl.float32) * _fp16_at(blk, mask)


@triton.jit
def _q4_0(row, k, mask):
    """Q4_0 (18-byte blocks of 32): fp16 d, then 16 bytes of nibbles; w = d * (q - 8)."""
    blk = row + (k // 32) * 18
    q = _nibble(blk + 2, k % 32, mask) - 8
    return _fp16_at(blk, mask) * q.to(tl.float32)


@triton.jit
def _mxfp4(row, k, mask):
    """ggml MXFP4 (17-byte blocks of 32): e8m0 exponent byte, then 16 bytes of e2m1 nibbles;
    w = kvalue(q) * 2**(e - 128), kvalue the doubled e2m1 value (0, 1, 2, 3, 4, 6, 8, 12, sign bit 3)."""
    blk = row + (k // 32) * 17
    e = _byte(blk, mask)
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # ggml_e8m0_to_fp32_half, subnormals included
    d = bits.to(tl.float32, bitcast=True)
    q = _nibble(blk + 1, k % 32, mask)
    m = q & 7
    ex = m >> 1
    mag = tl.where(ex == 0, m, (2 + (m & 1)) << tl.maximum(ex - 1, 0))
    return d * tl.where(q >= 8, -mag, mag).to(tl.float32)


@triton.jit
def _q4_k(row, k, mask):
    """Q4_K (144-byte super-blocks of 256): fp16 d, fp16 dmin, 12 bytes of 6-bit scales / mins of the 8
    sub-blocks of 32, then 128 bytes of nibbles (bytes 32c..32c+31: sub-block 2c low, 2c+1 high);
    w = (d * sc) * q - dmin * mn."""
    blk = row + (k // 256) * 144
    j = k % 256
    sb = j // 32  # sub-block 0..7
    # scale bytes a = [sb % 4], b = [4 + sb % 4], c = [8 + sb % 4]: sub-blocks 0-3 take the low 6 bits of a
    # (scale) and b (min); 4-7 take their low 4 bits from c's nibbles and the top 2 from a's / b's bits 6-7
    a = _byte(blk + 4 + sb % 4, mask)
    b = _byte(blk + 8 + sb % 4, mask)
    c = _byte(blk + 12 + sb % 4, mask)
    hi = sb >= 4
    sc = tl.where(hi, (c & 0xF) | ((a >> 2) & 0x30), a & 0x3F)
    mn = tl.where(hi, (c >> 4) | ((b >> 2) & 0x30), b & 0x3F)
    q = (_byte(blk + 16 + (sb // 2) * 32 + j % 32, mask) >> ((sb % 2) * 4)) & 0xF
    dl = _fp16_at(blk, mask) * sc.to(tl.float32)
    dm = _fp16_at(blk + 2, mask) * mn.to(tl.float32)
    return dl * q.to(tl.float32) - dm


@triton.jit
def _q6_k(row, k, mask):
    """Q6_K (210-byte super-blocks of 256): 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8
    scales (one per 16 weights), fp16 d. Weight j = 128h + 32s + l: low bits from ql[64h + (32s + l) % 64]
    (low nibble for s < 2, high for s >= 2), high bits (qh[32h + l] >> 2s) & 3; w = (d * sc[j // 16]) * (q - 32)."""
    blk = row + (k // 256) * 210
    j = k % 256
    h = j // 128
    r = j % 128
    lo = (_byte(blk + h * 64 + r % 64, mask) >> ((r // 64) * 4)) & 0xF
    hi = (_byte(blk + 128 + h * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
    q = (lo | (hi << 4)) - 32
    sc = (_byte(blk + 192 + j // 16, mask) ^ 0x80) - 0x80  # int8
    dl = _fp16_at(blk + 208, mask) * sc.to(tl.float32)
    return dl * q.to(tl.float32)


@triton.jit
def _gguf_tile(w_base, kk, cols, mask, stride_wn, WEIGHT_FORMAT: tl.constexpr):
    """[BK, BN] float32 tile w[cols, kk]^T of GGUF rows (uint8; row n starts at w_base + n * stride_wn),
    every weight decoded from its own block's bytes."""
    row = w_base + cols.to(tl.int64)[None, :] * stride_wn  # [1, BN] byte pointers to the rows
    k = kk[:, None]  # [BK, 1] weight index along the row
    if WEIGHT_FORMAT == WEIGHT_GGUF_Q8_0:
        w = _q8_0(row, k, mask)
    elif WEIGHT_FORMAT == WEIGHT_GGUF_Q4_0:
        w = _q4_0(row, k, mask)
    elif WEIGHT_FORMAT == WEIGHT_GGUF_Q4_K:
        w = _q4_k(row, k, mask)
    elif WEIGHT_FORMAT == WEIGHT_GGUF_Q6_K:
        w = _q6_k(row, k, mask)
    else:
        tl.static_assert(WEIGHT_FORMAT == WEIGHT_GGUF_MXFP4, "unknown GGUF WEIGHT_FORMAT")
        w = _mxfp4(row, k, mask)
    return w


@triton.jit
def _weight_tile(w_base, s_base, z_base, kk, cols, mask, stride_wn, stride_wk, stride_sn, stride_sg,
                 WEIGHT_FORMAT: tl.constexpr, GROUP: tl.constexpr):
    """[BK, BN] weight tile w[cols, kk]^T of one slot (kk: [BK] input indices, cols: [BN] output rows).
    WEIGHT_FLOAT: as stored. WEIGHT_INT8: q * s[n]. WEIGHT_INT4: (nibble(q[n, k // 2], k % 2) - z[n, k // G])
    * s[n, k // G], low nibble = even k. WEIGHT_GGUF_*: decoded from the row's blocks (_gguf_tile).
    Quantized tiles come back in float32; the scale/zero tile is gathered per (k, n), so any BLOCK_K
    works with any group size."""
    if WEIGHT_FORMAT >= WEIGHT_GGUF_Q8_0:
        return _gguf_tile(w_base, kk, cols, mask, stride_wn, WEIGHT_FORMAT)
    elif WEIGHT_FORMAT == WEIGHT_INT4:
        byte = tl.load(w_base + cols[None, :] * stride_wn + (kk // 2)[:, None] * stride_wk,
                       mask=mask, other=0).to(tl.int32)  # [BK, BN] packed pairs
        q = ((byte >> ((kk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
        g_off = cols[None, :] * stride_sn + (kk // GROUP)[:, None] * stride_sg  # [BK, BN]
        s = tl.load(s_base + g_off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_base + g_off, mask=mask, other=0.0).to(tl.float32)
        return (q - z) * s
    elif WEIGHT_FORMAT == WEIGHT_INT8:
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
    refusal = pool.kernel_refusal()
    if refusal is not None:
        raise ValueError(f"fused_moe: {refusal}")
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
                        I..2I-1) projections, or a WeightPool (pool.py: float, int8, int4 or GGUF views; its
                        kernel_format per projection picks the kernel's compile-time variant) with w2_pool
                        None.
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
    launch = dict(run.launch, GROUP=pool.group_size)
    p13, st13 = _weight_args(*pool.kernel_views("w13"))
    _gemm1_silu_kernel[(run.num_blocks, triton.cdiv(inter, cfg.block_n))](
        hidden, *p13, run.act, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter, run.k,
        hidden.stride(0), hidden.stride(1), *st13, run.act.stride(0), run.act.stride(1),
        WEIGHT_FORMAT=pool.kernel_format("w13"), **launch)
    p2, st2 = _weight_args(*pool.kernel_views("w2"))
    _gemm2_weighted_kernel[(run.num_blocks, triton.cdiv(h, cfg.block_n))](
        run.act, *p2, run.y, run.weights, al.sorted_ids, al.block_expert, run.slots, run.n, h, inter,
        run.act.stride(0), run.act.stride(1), *st2, run.y.stride(0), run.y.stride(1),
        WEIGHT_FORMAT=pool.kernel_format("w2"), **launch)
    return run.reduce()


def fused_moe_quant(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool: WeightPool,
                    slot_of_expert: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """fused_moe over a WeightPool (int8 / int4 / GGUF / float views): fused_moe(hidden, ids, weights, pool, None,
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
