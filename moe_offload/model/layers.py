"""Dense building blocks: RMSNorm, rotary embeddings, grouped-query attention over a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5: no repeated K/V copies.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (the reference's order of operations)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * xf.to(x.dtype)


def rope_tables(head_dim: int, theta: float, max_pos: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_pos, head_dim], computed in float32 then cast (as the reference does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd] times cos/sin broadcast against it (e.g. x [B, T, heads, hd], cos/sin [T, 1, hd])."""
    return x * cos + _rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int | torch.Tensor,
              sliding_window: int | None) -> torch.Tensor:
    """Causal grouped-query attention.

    q [B, nh, T, hd] at positions q_start..q_start+T-1; k, v [B, nkv, S, hd] at positions 0..S-1.
    q_start may be a tensor [B] (batched decode, T == 1): row b's query sits at q_start[b].
    Returns [B, nh, T, hd].
    """
    t, s = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    gqa = {}
    if rep > 1 and _SDPA_GQA:
        gqa = {"enable_gqa": True}
    elif rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if isinstance(q_start, torch.Tensor):
        qpos = q_start.view(-1, 1, 1, 1)  # [B, 1, T=1, 1]
        kpos = torch.arange(s, device=q.device).view(1, 1, 1, s)  # [1, 1, 1, S]
    elif t == 1 and (sliding_window is None or s <= sliding_window):
        return F.scaled_dot_product_attention(q, k, v, **gqa)  # one query sees every cached key
    else:
        qpos = torch.arange(q_start, q_start + t, device=q.device)[:, None]  # [T, 1]
        kpos = torch.arange(s, device=q.device)[None, :]  # [1, S]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= kpos > qpos - sliding_window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **gqa)
