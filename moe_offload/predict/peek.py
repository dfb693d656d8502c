"""Attention peek: a later layer's real attention applied to an *estimated* residual, reading the
earlier positions' real keys and values from the KV cache and never writing it. The M2R2 adapters'
chain (accelerator.Accelerator.chain) runs the accelerated residual through it, so a prediction for
layer l+d sees the context that layer attends to.

Built on the model's generic primitives: `MoeModel.project` (a layer's q/k/v heads with RoPE), the
KVCache's tensors and the layer's o_proj. Grouped-query attention as the model core computes it (the
families with MHA/GQA); a family with another attention (MLA) needs its own peek here.
"""

from __future__ import annotations

import math

import torch

from ..model.layers import linear, rms_norm
from ..model.transformer import KVCache, MoeModel, RowPositions


def peek_attention(model: MoeModel, layer: int, x: torch.Tensor, start: int | RowPositions,
                   cache: KVCache | None, real_until: int | None = None) -> torch.Tensor:
    """Layer `layer`'s attention output [B, T, H] for an estimated residual x [B, T, H] entering it,
    without touching the cache.

    Keys and values at positions before `real_until` (default: start, per row with RowPositions)
    are the cache's real ones for `layer`; the chunk's own positions from there on use x's, causally.
    real_until past the chunk (a cache already holding the chunk's real K/V, as in training) leaves
    each position only its own estimated key besides the real earlier ones: what decode sees."""
    layer = model.first_moe + layer  # the caller's MoE layer -> the model's layer (attention, KV cache)
    cfg, w = model.cfg, model.layers[layer]
    b, t, _ = x.shape
    nkv, hd, win = cfg.num_key_value_heads, cfg.head_dim, cfg.window(layer)
    if real_until is not None and isinstance(start, int) and real_until < start:
        raise ValueError(f"peek_attention: real_until {real_until} is before the chunk's start {start}; "
                         "positions between them would be neither real nor estimated")
    rep = cfg.num_attention_heads // nkv
    q, k, v = model.project(rms_norm(x, w.input_layernorm, cfg.rms_norm_eps), layer, start)
    if isinstance(start, RowPositions):
        qpos = start.pos.view(b, 1)  # [B, T=1]
        limit = qpos if real_until is None else qpos.clamp_max(real_until)
        span = start.span
    else:
        qpos = torch.arange(start, start + t, device=x.device).view(1, t)  # [1, T]
        limit = qpos.clamp_max(start if real_until is None else real_until)
        span = start if real_until is None else max(start, min(real_until, start + t))
    qg = q.reshape(b, nkv, rep * t, hd) / math.sqrt(hd)  # [B, nkv, rep*T, hd]: heads grouped by their kv head
    first = 0  # the first cached position any row can see (the sliding window drops older ones)
    if win is not None and isinstance(start, int):
        first = max(0, min(span, start - win + 1))
    if cache is not None and span > first:
        kh, vh = cache.k[layer, :, :, first:span], cache.v[layer, :, :, first:span]  # [B, nkv, S, hd], cache dtype
    else:
        kh = vh = x.new_zeros(b, nkv, 0, hd, dtype=q.dtype)
    kpos = first + torch.arange(kh.shape[2], device=x.device).view(1, 1, -1)  # [1, 1, S]
    seen = kpos < limit[..., None]  # [B|1, T, S]: real earlier keys
    own_pos = qpos[..., None, :]  # [B|1, 1, T]: the chunk's own key positions
    own = (own_pos <= qpos[..., None]) & (own_pos >= limit[..., None])  # estimated keys not covered by real ones
    if win is not None:
        seen &= kpos > qpos[..., None] - win
        own &= own_pos > qpos[..., None] - win
    s_h = (qg.to(kh.dtype) @ kh.transpose(-1, -2)).float().view(b, nkv, rep, t, -1)  # [B, nkv, rep, T, S]
    s_o = (qg @ k.transpose(-1, -2)).float().view(b, nkv, rep, t, t)  # [B, nkv, rep, T, T]
    s_h = s_h.masked_fill(~seen[:, None, None], float("-inf"))
    s_o = s_o.masked_fill(~own[:, None, None], float("-inf"))
    p = torch.softmax(torch.cat([s_h, s_o], dim=-1), dim=-1)  # [B, nkv, rep, T, S + T]
    S = kh.shape[2]
    o = ((p[..., :S].reshape(b, nkv, rep * t, S).to(vh.dtype) @ vh).float()
         + p[..., S:].reshape(b, nkv, rep * t, t) @ v.float())  # [B, nkv, rep*T, hd] float32
    o = o.view(b, nkv * rep, t, hd).transpose(1, 2).reshape(b, t, -1)  # [B, T, nh*hd]
    return linear(o.to(w.o_proj.dtype), w.o_proj)  # int8 rows too (dense_dtype)

