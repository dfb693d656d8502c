"""Torch references for fused_moe: a per-expert loop (the oracle, and the CPU path) and
torch._grouped_mm. Same contract as fused_moe: hidden [N, H], ids/weights [N, k], a slot pool
(w13 [S, 2I, H], w2 [S, H, I], or a pool object and None) and the slot of each expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_gemv


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T: the compiled CPU decode kernel for a few rows on cpu (cpu_gemv), else
    F.linear."""
    return cpu_gemv.linear(x, w) if cpu_gemv.use_for(x, w) else F.linear(x, w)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation: gate clamped above at `limit`, up clamped to [-limit, limit], then
    gate * sigmoid(alpha * gate) * (up + 1). gate, up [n, I] -> [n, I]."""

    limit: float = 7.0
    alpha: float = 1.702

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
               b2: torch.Tensor | None = None, act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """One gated expert. x [n, H], w13 [2I, H] (w1 rows then w3 rows), w2 [H, I] -> [n, H].
    b13 [2I], b2 [H]: the projections' biases where the expert has them (GPT-OSS); act(gate, up): the
    activation (None: SwiGLU, silu(gate) * up; a ClampedSwiGLU for GPT-OSS)."""
    gate_up = linear(x, w13)  # [n, 2I]
    if b13 is not None:
        gate_up = gate_up + b13
    gate, up = gate_up.chunk(2, dim=-1)  # [n, I] each
    y = linear(F.silu(gate) * up if act is None else act(gate, up), w2)
    return y if b2 is None else y + b2


def pool_expert(w13: Any, w2: torch.Tensor | None, slot: int, x: torch.Tensor) -> torch.Tensor:
    """Expert in `slot` of a pool on x [n, H] -> [n, H]: float views (w13, w2), or (pool, None) for a
    pool object with its own `ffn(slot, x)` (a pool.WeightPool: dequantize, then matmul; a
    quant_cpu.CpuQuantPool: the format's CPU weight-only op)."""
    if w2 is None:
        return w13.ffn(slot, x)
    return expert_ffn(x, w13[slot], w2[slot])


def moe_loop(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: Any,
             w2: torch.Tensor | None, slot_of_expert: Sequence[int] | None = None, *,
             ids_host: np.ndarray | None = None, experts: set[int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert loop: for each routed expert e (ascending), gather its tokens, run it, add weighted.

    h [N, H]; ids, weights [N, k]; w13 [S, 2I, H]; w2 [S, H, I] (or w13 a pool object and w2 None,
    see pool_expert); expert e lives in slot
    slot_of_expert[e] (identity when None). `ids_host` is the host copy of ids when the caller has
    one already (then this function reads nothing back from the device); otherwise ids are read back
    once. `experts` restricts the loop to those experts, accumulating into `out`: running groups of
    ascending experts one after another gives bit-identical results to one full call.
    """
    n, k = ids.shape
    if out is None:
        out = torch.zeros_like(h)
    flat_host = (ids_host if ids_host is not None else ids.cpu().numpy()).reshape(-1)  # [N*k]
    if n == 1 and w2 is not None and _float_glue(h, w13, w2, out):  # decode, float experts: one compiled call
        order = sorted(range(k), key=lambda j: flat_host[j])
        order = [j for j in order if experts is None or int(flat_host[j]) in experts]
        slots = [int(flat_host[j]) if slot_of_expert is None else int(slot_of_expert[int(flat_host[j])]) for j in order]
        a, b = [w13[s] for s in slots], [w2[s] for s in slots]  # a slot's rows: contiguous in any pool we make
        if all(t.is_contiguous() for t in a + b):
            cpu_gemv.experts_decode(h, a, b, weights[0].float().contiguous(), order, out)
            return out
    if n == 1 and w2 is None and getattr(w13, "a8_expert", None) is not None and _packed_glue(h, out):
        order = sorted(range(k), key=lambda j: flat_host[j])
        order = [j for j in order if experts is None or int(flat_host[j]) in experts]
        slots = [int(flat_host[j]) if slot_of_expert is None else int(slot_of_expert[int(flat_host[j])]) for j in order]
        specs = [w13.a8_expert(s, h) for s in slots]
        if all(sp is not None for sp in specs):  # packed experts, 8-bit activations: one compiled call
            cpu_gemv.experts_decode_a8(h, specs, weights[0].float().contiguous(), order, out)
            return out
    if n == 1:  # decode: one token, its k experts in ascending id, no gather/scatter
        for j in sorted(range(k), key=lambda j: flat_host[j]):
            e = int(flat_host[j])
            if experts is not None and e not in experts:
                continue
            slot = e if slot_of_expert is None else int(slot_of_expert[e])
            out.add_(pool_expert(w13, w2, slot, h).mul_(weights[0, j]).to(h.dtype))  # [1, H]
        return out
    order = np.argsort(flat_host, kind="stable")  # [N*k] grouped by expert, ascending
    sorted_e = flat_host[order]
    bounds = np.flatnonzero(np.diff(sorted_e)) + 1
    flat_w = weights.reshape(-1)  # [N*k]
    for sel in np.split(order, bounds):
        e = int(flat_host[sel[0]])
        if experts is not None and e not in experts:
            continue
        slot = e if slot_of_expert is None else int(slot_of_expert[e])
        sel_t = torch.from_numpy(sel).to(h.device)
        tok = sel_t // k  # [c]
        y = pool_expert(w13, w2, slot, h.index_select(0, tok))  # [c, H] (h[tok] is ~1000x slower on CPU)
        # rows of `tok` are distinct; index_put_(accumulate) adds exactly as index_add_ does, but
        # index_add_ on CPU in bf16/fp16 takes a slow path (68 ms vs 20 us for 16 rows of 1024)
        out.index_put_((tok,), (y * flat_w.index_select(0, sel_t)[:, None]).to(h.dtype), accumulate=True)
    return out


def one_token_experts(h: torch.Tensor, w13: Any, w2: torch.Tensor | None, num_experts: int
                      ) -> tuple[bool, list] | None:
    """What moe_loop's one-call paths run for one token h [1, H] against each expert of a layer's pool
    (identity slots), for a compiled decode step to run the same way: (True, [gate|up, down A8Projection of
    expert 0, ...]) for packed experts, (False, [(w13_e, w2_e), ...]) for float ones; None where moe_loop
    would take another path."""
    if w2 is not None:
        if not _float_glue(h, w13, w2, h):
            return None
        pairs = [(w13[e], w2[e]) for e in range(num_experts)]
        return (False, pairs) if all(a.is_contiguous() and b.is_contiguous() for a, b in pairs) else None
    if getattr(w13, "a8_expert", None) is None or not _packed_glue(h, h):
        return None
    specs = [w13.a8_expert(e, h) for e in range(num_experts)]
    return None if any(sp is None for sp in specs) else (True, [p for pair in specs for p in pair])


def _float_glue(h: torch.Tensor, w13: Any, w2: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether one token's float experts run as one compiled call (cpu_gemv.experts_decode)."""
    return (isinstance(w13, torch.Tensor) and w13.dtype == w2.dtype == out.dtype == h.dtype and h.dim() == 2
            and h.is_contiguous() and out.is_contiguous() and cpu_gemv.glue_runs(h, w13, w2))


def _packed_glue(h: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether one token's packed experts may run as one compiled call (cpu_gemv.experts_decode_a8; each
    pool says whether its experts take it)."""
    return (h.dim() == 2 and h.is_contiguous() and out.is_contiguous() and out.dtype == h.dtype
            and cpu_gemv.has_vnni() and cpu_gemv.glue_runs(h))


def fused_moe_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w13_pool: Any, w2_pool: torch.Tensor | None,
                        slot_of_expert: torch.Tensor) -> torch.Tensor:
    """Same contract as fused_moe (float pools, or a pool object and w2_pool None); a plain loop over experts in
    ascending id (shapes as there)."""
    return moe_loop(hidden, topk_ids.long(), topk_weights.float(), w13_pool, w2_pool,
                    slot_of_expert.tolist())


def grouped_mm_aligned(hidden_size: int, intermediate_size: int, itemsize: int) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes."""
    return (hidden_size * itemsize) % 16 == 0 and (intermediate_size * itemsize) % 16 == 0


def grouped_mm_supported(hidden: torch.Tensor, w13_pool: torch.Tensor) -> bool:
    """torch._grouped_mm exists and the row strides it needs are multiples of 16 bytes."""
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
    counts = torch.zeros(e, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
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
