"""Quantize and pack experts into the row layout of formats.expert_layout, and view packed pools.

int8: symmetric, one fp16 scale per output row: s = max|w| / 127, q = round(w / s) in [-127, 127].
int4: asymmetric, per group of G input columns: s = (max - min) / 15 over the group (with 0 inside
      [min, max]), z = round(-min / s) in [0, 15], q = round(w / s) + z in [0, 15]; w ~ (q - z) * s.
Scales are rounded to fp16 before q is computed, so dequantization uses exactly the stored scale.
"""

from __future__ import annotations

import torch

from ..kernels.quant import QuantPool
from .formats import DEFAULT_GROUP_SIZE, QUANT_FORMATS, Section, expert_layout

_TORCH = {"int8": torch.int8, "uint8": torch.uint8, "fp16": torch.float16}


def _safe_scale(s: torch.Tensor) -> torch.Tensor:
    """fp16 scales, with 1 where a row/group is all zeros (any scale then gives q = 0 -> w = 0)."""
    s = s.to(torch.float16)
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s fp16 [N])."""
    w = w.float()
    s = _safe_scale(w.abs().amax(dim=1) / 127)  # [N]
    q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, ceil(K/2)], s fp16 [N, ceil(K/G)], z fp16 [N, ceil(K/G)])."""
    w = w.float()
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, groups, group_size)  # [N, g, G]; pad is 0
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # [N, g], 0 inside [lo, hi]
    s = _safe_scale((hi - lo) / 15)  # [N, g]
    z = torch.round(-lo / s.float()).clamp_(0, 15)  # [N, g] integer zero points
    q = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, -1)[:, :k]  # [N, K]
    return pack_int4(q), s, z.to(torch.float16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values uint8 [N, K] in [0, 15] -> bytes [N, ceil(K/2)], even k in the low nibble."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_expert(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, fmt: str,
                    group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """One expert (w1, w3 [I, H]; w2 [H, I]) -> its sections by name (qw13, s13, [z13,] qw2, s2, [z2])."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"cannot quantize experts to {fmt!r}: one of {list(QUANT_FORMATS)}")
    w13 = torch.cat([w1, w3], dim=0)  # [2I, H]
    if fmt == "int8":
        (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
        return {"qw13": q13, "qw2": q2, "s13": s13, "s2": s2}
    (q13, s13, z13), (q2, s2, z2) = quantize_int4(w13, group_size), quantize_int4(w2, group_size)
    return {"qw13": q13, "qw2": q2, "s13": s13, "z13": z13, "s2": s2, "z2": z2}


def _section_view(rows: torch.Tensor, sec: Section) -> torch.Tensor:
    """rows uint8 [S, B] -> the section as [S, *shape] of its dtype (a view)."""
    part = rows[:, sec.offset: sec.offset + sec.nbytes]
    return part.view(_TORCH[sec.dtype]).view(rows.shape[0], *sec.shape)


def write_expert(row: torch.Tensor, sections: dict[str, torch.Tensor], hidden: int, inter: int, fmt: str,
                 group_size: int) -> None:
    """Write quantize_expert's sections into one uint8 row [B] (padding bytes set to 0)."""
    row.zero_()
    for sec in expert_layout(hidden, inter, fmt, group_size):
        _section_view(row[None], sec)[0].copy_(sections[sec.name])


def read_expert(row: torch.Tensor, hidden: int, inter: int, fmt: str, group_size: int) -> dict[str, torch.Tensor]:
    """The sections of one packed row [B] by name (views)."""
    return {sec.name: _section_view(row[None], sec)[0] for sec in expert_layout(hidden, inter, fmt, group_size)}


def pool_views(rows: torch.Tensor, hidden: int, inter: int, fmt: str, group_size: int) -> QuantPool:
    """A uint8 pool [S, B] of packed experts -> the QuantPool of views the kernels read."""
    v = {sec.name: _section_view(rows, sec) for sec in expert_layout(hidden, inter, fmt, group_size)}
    return QuantPool(fmt, group_size, hidden, inter, v["qw13"], v["s13"], v.get("z13"), v["qw2"], v["s2"],
                     v.get("z2"))
