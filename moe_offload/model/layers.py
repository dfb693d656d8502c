"""Dense building blocks: RMSNorm, rotary embeddings (plain and yarn-scaled), grouped-query attention
over a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import cpu_gemv, hostmem
from ..kernels import linear as _linear

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5: no repeated K/V copies.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias [N]): the compiled CPU decode kernel for a few rows on cpu
    (moe_offload.kernels.cpu_gemv: PyTorch's one-row matmul reaches a fraction of memory bandwidth),
    else F.linear. A weight stored in int8 (`int8_rows`) runs the int8 kernel, or is dequantized for
    many rows."""
    q8 = getattr(w, "int8_rows", None)
    if q8 is not None:
        q, s = q8  # int8 [N, K], fp16 [N]
        if x.numel() <= cpu_gemv.QUANT_MAX_ROWS * x.shape[-1]:
            y = cpu_gemv.int8_linear(x, q, s)
        else:
            y = F.linear(x, (q.float() * s.float()[:, None]).to(x.dtype))
        return y if bias is None else y + bias
    if bias is None:
        return _linear(x, w)
    return F.linear(x, w, bias) if x.device.type != "cpu" else _linear(x, w) + bias


def step_projection(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> cpu_gemv.StepProjection | None:
    """How `linear(x, w, bias)` runs one row x [1, K] on the CPU, for the compiled decode step
    (cpu_gemv.attn_block_decode runs it the same way), or None where it would take another path."""
    q8 = getattr(w, "int8_rows", None)
    if q8 is not None:
        return cpu_gemv.step_int8(x, q8[0], q8[1], bias) if cpu_gemv.available() else None
    return cpu_gemv.step_float(x, w, bias)


def store_int8_rows(w: torch.nn.Parameter, q: torch.Tensor, s: torch.Tensor) -> None:
    """Keep weight `w` [N, K] as int8 rows q [N, K] with fp16 scales s [N] (linear() reads them); its own
    storage is released (an empty tensor of its dtype remains, for code that asks the dtype)."""
    rows = hostmem.empty(tuple(q.shape), q.dtype, q.device)  # huge pages: decode streams it
    rows.copy_(q)
    w.int8_rows = (rows, s.contiguous())
    w.data = torch.empty(0, dtype=w.dtype, device=w.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (the reference's order of operations); a
    float32 weight under a half-precision x scales in float32, then casts (GPT-OSS keeps its norms in
    float32: families.Family.norms_float32). On the CPU: one compiled call, whatever the row count (a
    row's result never depends on the rows normed with it)."""
    if weight.shape == x.shape[-1:] and weight.dtype in (x.dtype, torch.float32) and cpu_gemv.glue_runs(x, weight):
        return cpu_gemv.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    if weight.dtype != x.dtype and weight.dtype == torch.float32:
        return (weight * xf).to(x.dtype)
    return weight * xf.to(x.dtype)


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """The plain RoPE inverse frequencies [dim/2] float32: theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """yarn's magnitude correction for a context stretched `factor` times: 0.1 mscale ln(factor) + 1
    (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 0.0, mscale_all_dim: float = 0.0,
                          attention_factor: float | None = None) -> float:
    """yarn's magnitude of the cos/sin tables: attention_factor where given, else
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) where both are set (DeepSeek),
    else yarn_mscale(factor)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_pos: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """yarn's inverse frequencies [dim/2] float32 (arXiv 2309.00071): the dims that turn more than
    beta_fast times over the pretraining context (original_max_pos) keep their frequency, those that turn
    fewer than beta_slow times are interpolated (divided by factor), and a linear ramp blends the ones in
    between. truncate: round the ramp's ends outwards to whole dims (DeepSeek's and transformers'
    default; GPT-OSS turns it off)."""
    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` turns in the context
        return dim * math.log(original_max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim/2]
    kept = 1.0 - ramp  # [dim/2]: each dim's share of its original frequency (1: kept, 0: interpolated)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1.0 - kept) + (1.0 / pos_freqs) * kept


def rope_tables(head_dim: int, theta: float, max_pos: int, dtype: torch.dtype, device: torch.device,
                inv_freq: torch.Tensor | None = None, attention_factor: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_pos, head_dim], computed in float32 then cast (as the reference does).
    inv_freq [head_dim/2] float32: the frequencies (default: rope_inv_freq); attention_factor scales
    both tables (yarn's magnitude correction of the rotated dims)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)
    pos = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd] times cos/sin broadcast against it (e.g. x [B, T, heads, hd], cos/sin [T, 1, hd])."""
    return x * cos + _rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int | torch.Tensor,
              sliding_window: int | None, scale: float | None = None, sinks: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Causal grouped-query attention.

    q [B, nh, T, hd] at positions q_start..q_start+T-1; k [B, nkv, S, hd], v [B, nkv, S, hv] at
    positions 0..S-1 (hv may differ from hd: MLA). q_start may be a tensor [B] (batched decode, T == 1):
    row b's query sits at q_start[b]. scale: the softmax scale (default hd ** -0.5). sinks [nh]: a
    learned logit per head that joins each query's softmax and whose share is dropped (GPT-OSS; see
    sink_attention). Returns [B, nh, T, hv].
    """
    t, s = q.shape[2], k.shape[2]
    if sinks is not None:
        return sink_attention(q, k, v, causal_mask(q_start, t, s, sliding_window, q.device), sinks, scale)
    rep = q.shape[1] // k.shape[1]
    kw = {} if scale is None else {"scale": scale}
    if rep > 1 and _SDPA_GQA:
        kw["enable_gqa"] = True
    elif rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    allowed = causal_mask(q_start, t, s, sliding_window, q.device)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)  # one query sees every cached key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kw)


def causal_mask(q_start: int | torch.Tensor, t: int, s: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor | None:
    """Which keys 0..S-1 each query at q_start.. may see (as attention's): [T, S], or [B, 1, 1, S] for a
    tensor q_start [B]; None when every query sees every key (one query, no window cutting)."""
    if isinstance(q_start, torch.Tensor):
        qpos = q_start.view(-1, 1, 1, 1)  # [B, 1, T=1, 1]
        kpos = torch.arange(s, device=device).view(1, 1, 1, s)  # [1, 1, 1, S]
    elif t == 1 and (sliding_window is None or s <= sliding_window):
        return None
    else:
        qpos = torch.arange(q_start, q_start + t, device=device)[:, None]  # [T, 1]
        kpos = torch.arange(s, device=device)[None, :]  # [1, S]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= kpos > qpos - sliding_window
    return allowed


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   sinks: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention with a sink logit per head (GPT-OSS): each query's softmax runs over its allowed keys'
    scores and the head's sink; the sink's probability is dropped, so the keys' weights sum to less than
    one. Scores and softmax in float32. q [B, nh, T, hd], k/v [B, nkv, S, hd], allowed a mask that
    broadcasts to [B, nh, T, S] (None: all keys), sinks [nh] -> [B, nh, T, hd] in v's dtype."""
    b, nh, t, hd = q.shape
    rep = nh // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * (hd ** -0.5 if scale is None else scale)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))  # [B, nh, T, S]
    sink = sinks.float().view(1, nh, 1, 1).expand(b, nh, t, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]  # the sink's share dropped
    return torch.matmul(probs.to(v.dtype), v)
