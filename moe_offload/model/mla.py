"""DeepSeek's multi-head latent attention (MLA, DeepSeek-V2 paper arXiv 2405.04434), over a KV cache that
holds only the compressed latent and the shared rope key of each token.

Per token x [H]: the query comes from q_proj, or with q-LoRA from q_b_proj(RMSNorm(q_a_proj(x))), and splits
per head into a position-free part q_nope [dn] and a rotary part q_rope [dr]. kv_a_proj_with_mqa(x) gives
the latent c [r] (RMSNorm'd by kv_a_layernorm) and one rope key k_rope [dr] shared by all heads. Each
head's key is [c W_UK_h ; k_rope] and its value c W_UV_h, where kv_b_proj [nh (dn + dv), r] stacks W_UK_h
[dn, r] and W_UV_h [dv, r] per head. So the cache stores [c ; k_rope] (r + dr numbers per token and layer)
and decode never expands it: the query is absorbed into latent space, [q_nope W_UK_h ; q_rope], attends
to the cached rows as one shared key head, and the latent output goes through W_UV_h; prefill (several
queries) expands keys and values from the latents, as transformers does. The softmax scale is
(dn + dr) ** -0.5, times yarn_mscale(factor, mscale_all_dim) ** 2 under yarn RoPE.

The rope dims of q_rope and k_rope pair up interleaved, (0, 1), (2, 3), ... (cfg.rope_interleave, both
DeepSeek generations' layout; a V3 config with rope_interleave false rotates the two halves, as Llama);
V3 rotates them in the compute dtype, V2 in float32 (the family's rope_float32), each as its
transformers model does. The rotated dims come out evens-then-odds: keys and
queries share the order, so the scores are the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import apply_rope, attention, linear, rms_norm, yarn_mscale

# The latent and q-LoRA RMSNorms use DeepSeek's fixed epsilon, not config.json's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """MLA's attention scale: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times yarn's mscale
    (of mscale_all_dim) squared when the RoPE is yarn with mscale_all_dim set."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_type == "yarn" and cfg.rope_mscale_all_dim:
        m = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


class LatentAttention:
    """The MLA computation of one model (its shapes and constants; each DenseLayer holds its weights):
    qkv_proj [q + r + dr, H] fuses the query projection (q = q_lora_rank, or nh (dn + dr) without q-LoRA)
    with kv_a_proj_with_mqa; q_a_layernorm, q_b_proj (q-LoRA), kv_a_layernorm, kv_b_proj, o_proj."""

    def __init__(self, cfg: ModelConfig):
        self.nh, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                              cfg.v_head_dim)
        self.r, self.q_lora = cfg.kv_lora_rank, cfg.q_lora_rank
        self.q_width = self.q_lora or self.nh * (self.dn + self.dr)
        self.scale = softmax_scale(cfg)
        self.interleave = cfg.rope_interleave
        self.rope_float32 = bool(getattr(cfg.family, "rope_float32", False))

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., dr] rotated by the tables cos/sin [..., dr] (broadcast against x; float32 tables for a
        float32 rotation). Interleaved pairs come out evens then odds."""
        dtype = x.dtype
        if self.rope_float32:
            x = x.float()
        if not self.interleave:
            return apply_rope(x, cos, sin).to(dtype)
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]  # each pair's angle (the tables repeat it in both halves)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # [..., dr/2] each
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)

    def project(self, x: torch.Tensor, w: nn.Module, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] (normed) -> q_nope [B, nh, T, dn], q_rope [B, nh, T, dr] (rotated) and the cache rows
        [B, 1, T, r + dr]: the normed latent c and the rotated rope key. cos/sin broadcast against
        [B, T, heads, dr] (e.g. [T, 1, dr])."""
        b, t, _ = x.shape
        q, kv = linear(x, w.qkv_proj).split((self.q_width, self.r + self.dr), dim=-1)  # [B, T, q], [B, T, r + dr]
        if self.q_lora:
            q = linear(rms_norm(q, w.q_a_layernorm, LATENT_NORM_EPS), w.q_b_proj)  # [B, T, nh (dn + dr)]
        q = q.view(b, t, self.nh, self.dn + self.dr)
        c, k_rope = kv.split((self.r, self.dr), dim=-1)  # [B, T, r], [B, T, dr]
        c = rms_norm(c, w.kv_a_layernorm, LATENT_NORM_EPS)
        q_rope = self.rope(q[..., self.dn:], cos, sin)  # [B, T, nh, dr]
        k_rope = self.rope(k_rope[:, :, None], cos, sin)  # [B, T, 1, dr]
        rows = torch.cat((c[:, :, None], k_rope), dim=-1).transpose(1, 2)  # [B, 1, T, r + dr]
        return q[..., :self.dn].transpose(1, 2), q_rope.transpose(1, 2), rows

    def __call__(self, x: torch.Tensor, w: nn.Module, layer: int, start: int | Any, cache: Any,
                 cos: torch.Tensor, sin: torch.Tensor, absorb: bool) -> torch.Tensor:
        """Layer `layer`'s attention output [B, T, H] for its normed input x [B, T, H] at positions start..
        (or a transformer.RowPositions), writing its latent rows into the cache (a transformer.KVCache of
        latent rows, or None). w: the layer's transformer.DenseLayer. absorb: attend in latent space (one
        query per row: decode); else expand keys and values per head (prefill)."""
        b, t, _ = x.shape
        q_nope, q_rope, rows = self.project(x, w, cos, sin)
        if cache is not None:
            rows = cache.update(layer, rows, None, start)[0]  # [B, 1, S, r + dr]: every cached position
        q_start = start if isinstance(start, int) else start.pos
        kv_b = w.kv_b_proj.view(self.nh, self.dn + self.dv, self.r)  # per head: W_UK [dn, r] then W_UV [dv, r]
        if absorb:
            q = torch.cat((q_nope @ kv_b[:, :self.dn], q_rope), dim=-1)  # [B, nh, T, r + dr]
            o = attention(q, rows, rows[..., :self.r], q_start, None, self.scale)  # [B, nh, T, r]
            o = o @ kv_b[:, self.dn:].transpose(1, 2)  # [B, nh, T, dv]
        else:
            s = rows.shape[2]
            kv = linear(rows[:, 0, :, :self.r], w.kv_b_proj).view(b, s, self.nh, self.dn + self.dv)
            k_nope, v = kv.transpose(1, 2).split((self.dn, self.dv), dim=-1)  # [B, nh, S, dn], [B, nh, S, dv]
            k = torch.cat((k_nope, rows[..., self.r:].expand(b, self.nh, s, self.dr)), dim=-1)  # [B, nh, S, dn + dr]
            o = attention(torch.cat((q_nope, q_rope), dim=-1), k, v, q_start, None, self.scale)  # [B, nh, T, dv]
        return linear(o.transpose(1, 2).reshape(b, t, self.nh * self.dv), w.o_proj)
