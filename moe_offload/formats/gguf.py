"""GGUF block formats (llama.cpp's ggml types), kept as the file stores them.

An expert of a GGUF file is three matrices, gate (w1) [I, H], up (w3) [I, H] and down (w2) [H, I],
each a run of the file's blocks along the input dimension (one row = K / block_size blocks), each
possibly of a different type. One expert row (a device slot, or a host row) is the three runs back to
back exactly as the file has them (sections w1, w3, w2, no padding: the codecs read bytes, never
aligned words), so bytes per miss are the file's bytes. The host store does not copy them: it reads
the file's memory map (offload/store.py), each expert three pieces of it (offload/rows.Segments).

One codec per block type (BLOCK_TYPES): its block size, bytes per block and a vectorised torch
dequantization of blocks uint8 [n, bytes] -> float32 [n, block_size] that does the float32 operations
of gguf.quants (llama.cpp's own Python reference) in the same order, so the two agree bit for bit
(tests/test_gguf.py checks every type against gguf.quants.dequantize).

Running: dequantize a tile of output rows, then matmul (GgufPool.ffn), never a whole expert per token
beyond one tile (moe_backend 'loop', CPU and CUDA). The fused Triton kernel (moe_backend 'triton') decodes
Q8_0, Q4_0, Q4_K, Q6_K and MXFP4 rows in registers, a WEIGHT_FORMAT flag per projection (GgufPool.
kernel_format), gate and up read as one [2I, rb(H)] matrix, so they must share a type; other types and
mixed gate/up run on the loop only (gguf_triton_problem names the layer, projection and type). Tested
under the Triton interpreter only until a GPU run confirms it (benchmarks/gpu_check.py gguf_kernels).

A CPU run with every expert resident (offload.packed.PackedResidentExperts) copies the experts out of the
map into huge-page RAM when they fit (GgufPool.in_ram): Q4_0 in the int4 format's layout (nibbles
re-paired, d as the group-32 scale: the same bytes and values, run by the int4 kernels), Q4_K repacked
(Q4kRows: values in the int4 layout, the 6-bit scales and mins as bytes, 148 bytes per 256 weights where
the file has 144: a kernel in 128-weight steps instead of decoding each super-block's scales per token),
Q6_K repacked likewise (Q6kRows: low four bits in the int4 layout, the high two in a plane of their own,
the file's 210 bytes per 256 weights), other types as the file's blocks. The host store itself stays the
map.

Experts with biases (llama.cpp's gpt-oss: ffn_{gate,up,down}_exps.bias beside the blocks) are a
GgufBiasedFormat (with_bias(dtype, act)): the row starts with the three bias vectors in the file's float
dtype, then the blocks; its pool (GgufBiasedPool) adds them and runs the family's activation (the clamped
SwiGLU), loop backend only. Its name is the unbiased one's: the file decides whether biases exist.

Format names: 'gguf:' + the three types, 'gguf:Q4_0' when all three agree, else 'gguf:Q4_K,Q4_K,Q6_K'
(gate, up, down); get_format() parses them, so the name alone rebuilds the format. A file whose layers
differ (llama.cpp's Q4_K_M gives some layers Q6_K down projections; unsloth's mixes vary more) is one
GgufLayersFormat: the layers' specs joined by ';', a run of equal layers as 'spec*N', e.g.
'gguf:Q4_K,Q4_K,Q6_K*2;Q4_K*30'. Each layer keeps its own row layout; a device slot is sized for the
largest (expert_bytes) and each layer reads its slots through its own views (per_layer()).
"""

from __future__ import annotations

import copy
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch

from ..kernels import cpu_gemv, hostmem
from ..kernels.pool import GGUF_FLAGS, WEIGHT_NONE, WeightPool
from ..kernels.quant_cpu import CpuQuantPool
from .base import ExpertFormat, PackedFormat, Section, align
from .int4 import Int4Pool

QK_K = 256
TILE_ROWS = 512  # output rows dequantized at a time by GgufPool.ffn


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n, 1] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, ..., B] -> [n, ..., 2B]: the low nibbles of all B bytes, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [n, count/8] little-endian bit field -> uint8 [n, count] of 0/1 (bit i of byte i // 8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b[..., None] >> shifts) & 1).reshape(b.shape[0], count)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    return _f16(b[:, :2]) * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5(b: torch.Tensor, off: int) -> torch.Tensor:
    """The 5-bit values of a Q5_0 / Q5_1 block whose qh starts at byte `off`."""
    qh = _bits(b[:, off:off + 4], 32)
    return _nibbles(b[:, off + 4:]) | (qh << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _q5(b, 4).float() + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).float()).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = (scales[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 2, 1)).reshape(n, 16)
    hi = (scales[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1))
    qh = (hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1))
    ql = ql.reshape(n, 16, 16) & 3
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of a Q4_K / Q5_K block: uint8 [n, 12] -> ([n, 8], [n, 8])."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks [n, bytes] -> per-sub-block scale and min, each [n, 8, 1] float32."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, dm = _k4_scales(b)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, dm = _k4_scales(b)
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)  # [n, 8, 32]
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (ql | ((qh & 1) << 4)).float()
    return (dl * q - dm).reshape(n, QK_K)


def _q6_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks uint8 [n, 210] -> their 256 values q in [0, 63] in order (the weight is d * sc * (q - 32))."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)) & 3
    return (lo | (hi.reshape(n, 8, 32) << 4)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, d = b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * sc.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    q = _q6_values(b).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1 doubled (ggml's kvalues_mxfp4)


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    """ggml MXFP4 (GPT-OSS in GGUF): e8m0 byte, then 16 bytes: low nibbles are values 0-15, high 16-31;
    value = kvalue * 2**(e - 128) (ggml_e8m0_to_fp32_half: doubled kvalues, halved scale)."""
    e = b[:, :1].to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    lut = torch.tensor(MXFP4_KVALUES, dtype=torch.float32, device=b.device)
    return d * lut[_nibbles(b[:, 1:]).long()]


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: `block` weights in `nbytes` bytes, dequantized by `dequant`."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block: int
    nbytes: int
    dequant: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of k weights (k a multiple of the block size)."""
        return k // self.block * self.nbytes

    def dequantize(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """uint8 [N, row_bytes(k)] -> float32 [N, k]."""
        n = q.shape[0]
        return self.dequant(q.reshape(-1, self.nbytes)).reshape(n, k)


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18, _q4_0), BlockType("Q4_1", 3, 32, 20, _q4_1),
    BlockType("Q5_0", 6, 32, 22, _q5_0), BlockType("Q5_1", 7, 32, 24, _q5_1),
    BlockType("Q8_0", 8, 32, 34, _q8_0), BlockType("Q2_K", 10, QK_K, 84, _q2_k),
    BlockType("Q3_K", 11, QK_K, 110, _q3_k), BlockType("Q4_K", 12, QK_K, 144, _q4_k),
    BlockType("Q5_K", 13, QK_K, 176, _q5_k), BlockType("Q6_K", 14, QK_K, 210, _q6_k),
    BlockType("MXFP4", 39, 32, 17, _mxfp4))}
BY_GGML_TYPE = {t.ggml_type: t for t in BLOCK_TYPES.values()}
PREFIX = "gguf:"


def gguf_format_name(types: tuple[str, str, str]) -> str:
    """(gate, up, down) type names -> the format name."""
    return PREFIX + (types[0] if len(set(types)) == 1 else ",".join(types))


def parse_gguf_name(name: str) -> tuple[str, str, str]:
    """'gguf:Q4_0' or 'gguf:Q4_K,Q4_K,Q6_K' -> (gate, up, down) type names; ValueError otherwise."""
    parts = name.removeprefix(PREFIX).split(",")
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p not in BLOCK_TYPES for p in parts):
        raise ValueError(f"expert format {name!r}: GGUF types must be one or three of {list(BLOCK_TYPES)}")
    return parts[0], parts[1], parts[2]


def gguf_layers_name(layers: list[tuple[str, str, str]]) -> str:
    """Per-layer (gate, up, down) types -> the format name: one layer's name when all agree, else the
    layers' specs joined by ';' with runs of equal layers as 'spec*N'."""
    specs = [gguf_format_name(t).removeprefix(PREFIX) for t in layers]
    if len(set(specs)) == 1:
        return PREFIX + specs[0]
    runs: list[list] = []
    for spec in specs:
        if runs and runs[-1][0] == spec:
            runs[-1][1] += 1
        else:
            runs.append([spec, 1])
    return PREFIX + ";".join(spec if n == 1 else f"{spec}*{n}" for spec, n in runs)


def parse_gguf_layers(name: str) -> list[tuple[str, str, str]]:
    """A per-layer name ('gguf:Q4_K,Q4_K,Q6_K*2;Q4_K*30') -> the (gate, up, down) types of each layer."""
    out = []
    for part in name.removeprefix(PREFIX).split(";"):
        spec, _, count = part.partition("*")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"expert format {name!r}: a run of layers is 'spec*N' with N >= 1, got {part!r}")
        out += [parse_gguf_name(spec)] * (int(count) if count else 1)
    return out


def gguf_triton_problem(types: tuple[str, str, str], where: str = "") -> str | None:
    """Why the fused Triton kernel cannot read experts of (gate, up, down) block `types` (one line naming
    the projection and type; `where` e.g. ' of layer 3'), or None when it can."""
    for proj, t in zip(("gate", "up", "down"), types):
        if t not in GGUF_FLAGS:
            return (f"GGUF experts{where}: the {proj} projection is {t}; moe_backend 'triton' runs "
                    f"{', '.join(GGUF_FLAGS)} (other types run on 'loop')")
    if types[0] != types[1]:
        return (f"GGUF experts{where}: gate is {types[0]} and up is {types[1]}; moe_backend 'triton' reads gate and "
                "up as one matrix of one type")
    return None


@dataclass
class GgufPool(WeightPool):
    """GGUF views: w13 = gate blocks uint8 [S, I, rb(H)], w3 = up blocks [S, I, rb(H)], w2 = down blocks
    [S, H, rb(I)] (rb: the type's row bytes); `types` the three BlockTypes."""

    w3: torch.Tensor | None = None
    types: tuple[BlockType, BlockType, BlockType] | None = None

    @property
    def weight_format(self) -> int:
        """The gate / up projection's kernel flag (WEIGHT_NONE: no kernel variant reads it)."""
        return self.kernel_format("w13")

    def kernel_format(self, which: str) -> int:
        t1, t3, t2 = self.types
        if which == "w2":
            return GGUF_FLAGS.get(t2.name, WEIGHT_NONE)
        return GGUF_FLAGS.get(t1.name, WEIGHT_NONE) if t1 == t3 else WEIGHT_NONE

    def kernel_refusal(self) -> str | None:
        return gguf_triton_problem(tuple(t.name for t in self.types))

    def kernel_views(self, which: str) -> tuple[torch.Tensor, None, None]:
        """w13: gate and up as one uint8 [S, 2I, rb(H)], a view where up follows gate in each row (slot
        rows, device rows), else a copy (a pool over a file's separate gate / up tensors); w2: down."""
        if which == "w2":
            return self.w2, None, None
        g, u = self.w13, self.w3
        s, i, rb = g.shape
        if (u.stride() == g.stride() and g.stride(2) == 1
                and u.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
                and u.storage_offset() == g.storage_offset() + i * g.stride(1)):
            return g.as_strided((s, 2 * i, rb), g.stride()), None, None
        return torch.cat([g, u], dim=1), None, None

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        t1, t3, t2 = self.types
        if which == "w13":
            return torch.cat([t1.dequantize(self.w13[slot], self.hidden), t3.dequantize(self.w3[slot], self.hidden)])
        return t2.dequantize(self.w2[slot], self.inter)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU on x [n, H] -> [n, H], dequantizing TILE_ROWS output rows at a time."""
        t1, t3, t2 = self.types
        g, u = self.w13[slot], self.w3[slot]
        if t1 == t3 and _kernel_takes(t1, g, self.hidden, x) and u.is_contiguous():  # one call: x rounded once
            gate, up = cpu_gemv.gguf_linear(x, [g, u], t1.name).chunk(2, dim=-1)
        else:
            gate, up = _tiled(t1, g, self.hidden, x), _tiled(t3, u, self.hidden, x)
        return _tiled(t2, self.w2[slot], self.inter, torch.nn.functional.silu(gate) * up)


    def in_ram(self, alloc: Any = None) -> WeightPool:
        """The experts copied into huge-page RAM: Q4_0 everywhere as the int4 layout (q4_0_as_int4: the same
        bytes, run by the int4 kernels), Q4_K / Q6_K gate+up and down repacked (GgufRamPool), any other type as
        the file's blocks (read by the GGUF kernels)."""
        alloc = alloc or hostmem.empty
        names = tuple(t.name for t in self.types)
        if type(self) is GgufPool and names == ("Q4_0",) * 3:
            return q4_0_as_int4(self, alloc)
        if type(self) is GgufPool and ((names[0] == names[1] and names[0] in REPACKED) or names[2] in REPACKED):
            return GgufRamPool.copy_of(self, alloc)
        return replace(self, **{f.name: _ram_copy(getattr(self, f.name), alloc) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def a8_expert(self, slot: int, x: torch.Tensor) -> tuple[cpu_gemv.A8Projection, ...] | None:
        t1, t3, t2 = self.types
        if t1 != t3 or not (cpu_gemv.int8_activations(x, self.hidden) and cpu_gemv.int8_activations(x, self.inter)):
            return None
        w13 = cpu_gemv.a8_gguf([self.w13[slot], self.w3[slot]], t1.name)
        w2 = cpu_gemv.a8_gguf([self.w2[slot]], t2.name)
        return None if w13 is None or w2 is None else (w13, w2)


def _ram_copy(t: torch.Tensor, alloc: Callable) -> torch.Tensor:
    """t copied into a contiguous host tensor from alloc(shape, dtype)."""
    out = alloc(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def _slot_rows(slots: int, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], alloc: Callable
               ) -> dict[str, torch.Tensor]:
    """One host buffer (alloc(shape, dtype)) of `slots` rows, each the sections `specs` (name, dtype, shape) on 64-byte
    boundaries, as a PackedFormat row is: every section as [slots, *shape] views, by name. A slot's
    weights and scales lie together, as in the host store's rows (separate tensors per section measured
    7% slower per expert on Q4_0 copies)."""
    secs, offset = [], 0
    for name, dt, shape in specs:
        sec = Section(name, dt, shape, offset)
        secs.append(sec)
        offset = align(offset + sec.nbytes, 64)
    rows = alloc((slots, offset), torch.uint8)
    return {sec.name: sec.view(rows) for sec in secs}


def q4_0_rows_as_int4(rows: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """Q4_0 rows uint8 [N, K/32 * 18] -> q uint8 [N, K/2] in the int4 layout (weight k the low nibble of
    byte k // 2 when k is even, the high one when odd) and s fp16 [N, K/32] the blocks' d, written in
    place: w = (q - 8) * d either way, so the values are the file's exactly."""
    n, nb = rows.shape[0], rows.shape[1] // 18
    blocks = rows.reshape(n, nb, 18)
    s.copy_(blocks[..., :2].contiguous().view(torch.float16).view(n, nb))
    nib = blocks[..., 2:]  # [N, nb, 16]: byte j holds element j (low nibble) and j + 16 (high)
    vals = torch.cat([nib & 0x0F, nib >> 4], dim=-1)  # [N, nb, 32] the block's elements in order
    q.view(n, nb, 16).copy_(vals[..., 0::2] | (vals[..., 1::2] << 4))


@functools.lru_cache(maxsize=8)
def _eights(n: int, groups: int) -> torch.Tensor:
    """fp16 [n, groups] of 8.0: the zero points of symmetric int4 rows, one tensor for every slot and layer
    of that shape (never written; the symmetric kernels do not read it, dequantization does)."""
    return torch.full((n, groups), 8.0, dtype=torch.float16)


def q4_0_as_int4(pool: "GgufPool", alloc: Callable = hostmem.empty) -> Int4Pool:
    """A Q4_0 pool as a symmetric int4 pool with groups of 32 in huge-page RAM: nibbles [S, N, K/2] and the
    blocks' fp16 d as scales [S, N, K/32], gate and up as one w13 (18 bytes per 32 weights, as the file);
    the zero points (all 8) are one expert's worth shared by every layer of the shape (_eights)."""
    S, H, I = pool.num_slots, pool.hidden, pool.inter
    v = _slot_rows(S, [("qw13", torch.uint8, (2 * I, H // 2)), ("qw2", torch.uint8, (H, I // 2)),
                       ("s13", torch.float16, (2 * I, H // 32)), ("s2", torch.float16, (H, I // 32))], alloc)
    qw13, qw2, s13, s2 = v["qw13"], v["qw2"], v["s13"], v["s2"]
    for e in range(S):
        q4_0_rows_as_int4(pool.w13[e], qw13[e, :I], s13[e, :I])
        q4_0_rows_as_int4(pool.w3[e], qw13[e, I:], s13[e, I:])
        q4_0_rows_as_int4(pool.w2[e], qw2[e], s2[e])
    z13 = _eights(2 * I, H // 32).expand(S, -1, -1)  # z13[e] contiguous
    z2 = _eights(H, I // 32).expand(S, -1, -1)
    return Int4Pool(H, I, qw13, qw2, s13=s13, s2=s2, z13=z13, z2=z2, group_size=32, symmetric=True)


def q4_k_rows_repacked(rows: torch.Tensor, q: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor) -> None:
    """Q4_K rows uint8 [N, K/256 * 144] -> (written in place) q uint8 [N, K/2] the values in the int4 layout,
    sc / mn uint8 [N, K/32] each sub-block's 6-bit scale and min, dd fp16 [N, K/256, 2] each super-block's
    d and dmin: the file's values, 148 bytes per 256 weights where the file packs them in 144."""
    n, nsb = rows.shape[0], rows.shape[1] // 144
    b = rows.reshape(n * nsb, 144)
    dd.view(n * nsb, 2).copy_(b[:, :4].contiguous().view(torch.float16))
    s, m = _scale_min_k4(b[:, 4:16])  # [n * nsb, 8] each
    sc.view(n * nsb, 8).copy_(s)
    mn.view(n * nsb, 8).copy_(m)
    vals = _nibbles(b[:, 16:].reshape(n * nsb, 4, 32)).reshape(n * nsb, QK_K)  # the block's weights in order
    q.view(n * nsb, QK_K // 2).copy_(vals[:, 0::2] | (vals[:, 1::2] << 4))


class _RepackedRows(ABC):
    """Projections of every slot in a repacked layout (a frozen dataclass of [S, N, ...] tensors, the packed
    values first, one per `sections` entry): `kernel` runs them against 8-bit activations, `dequant` gives
    gguf.quants' values; `write(rows, *sections)` fills one matrix's sections from its file rows."""

    kernel: Callable
    a8_kind: Callable
    write: Callable

    @staticmethod
    @abstractmethod
    def sections(k: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape per output row) of each field, for input dimension k."""

    @abstractmethod
    def dequant(self, e: int, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of slot e as float32 [hi - lo, K], bit-equal to gguf.quants."""

    @classmethod
    def repack(cls, mats: list[torch.Tensor], k: int, alloc: Callable = hostmem.empty) -> "_RepackedRows":
        """Matrices of the type's file rows uint8 [S, N_i, row bytes] (gate and up: stacked along N), in one
        slot-rows buffer from alloc(shape, dtype) (_slot_rows)."""
        S, N = mats[0].shape[0], sum(m.shape[1] for m in mats)
        v = _slot_rows(S, [(name, dt, (N, *shape)) for name, dt, shape in cls.sections(k)], alloc)
        for e in range(S):
            lo = 0
            for m in mats:
                hi = lo + m.shape[1]
                cls.write(m[e], *(t[e, lo:hi] for t in v.values()))
                lo = hi
        return cls(*v.values())

    def slot(self, e: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name)[e] for f in fields(self))

    @property
    def values(self) -> torch.Tensor:
        """The packed values [S, N, ...] (what stands for the projection in the pool's w13 / w2)."""
        return getattr(self, fields(self)[0].name)

    @property
    def rows(self) -> int:
        return self.values.shape[1]

    def a8(self, e: int) -> cpu_gemv.A8Projection:
        """Slot e's projection as the one-call expert path takes it."""
        return type(self).a8_kind(*self.slot(e))

    def linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] @ W^T -> [n, N]: the 8-bit activation kernel for a few rows, else TILE_ROWS dequantized
        output rows at a time."""
        k = x.shape[-1]
        if x.device.type == "cpu" and x.shape[0] <= cpu_gemv.QUANT_MAX_ROWS and cpu_gemv.int8_activations(x, k):
            return type(self).kernel(x, *self.slot(e))
        n = self.rows
        return torch.cat([x @ self.dequant(e, i, min(i + TILE_ROWS, n)).to(x.dtype).t() for i in range(0, n, TILE_ROWS)],
                         dim=-1)


@dataclass(frozen=True)
class Q4kRows(_RepackedRows):
    """GGUF Q4_K projections repacked for the CPU kernels (q4_k_rows_repacked), slot dimension first: q
    uint8 [S, N, K/2], sc / mn uint8 [S, N, K/32], dd fp16 [S, N, K/256, 2]. cpu_gemv.q4k_linear runs
    them against 8-bit activations (128 weights per step, as the int4 kernel) instead of decoding each
    super-block's packed 6-bit scales per token."""

    q: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    dd: torch.Tensor

    kernel = staticmethod(cpu_gemv.q4k_linear)
    a8_kind = staticmethod(cpu_gemv.a8_q4k)
    write = staticmethod(q4_k_rows_repacked)

    @staticmethod
    def sections(k: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [("q", torch.uint8, (k // 2,)), ("sc", torch.uint8, (k // 32,)), ("mn", torch.uint8, (k // 32,)),
                ("dd", torch.float16, (k // QK_K, 2))]

    def dequant(self, e: int, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of slot e as float32 [hi - lo, K]: d * sc * q - dmin * mn, the float32 operations of
        gguf.quants (and of _q4_k) in the same order."""
        q, sc, mn, dd = (t[e, lo:hi] for t in (self.q, self.sc, self.mn, self.dd))
        r, subs = q.shape[0], sc.shape[1]
        vals = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(r, subs, 32).float()
        d = dd.float().repeat_interleave(8, dim=1)  # [r, subs, 2]: each sub-block's super-block d, dmin
        dl, dm = d[..., 0] * sc.float(), d[..., 1] * mn.float()
        return (dl[..., None] * vals - dm[..., None]).reshape(r, subs * 32)


def q6_k_rows_repacked(rows: torch.Tensor, ql: torch.Tensor, qh: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> None:
    """Q6_K rows uint8 [N, K/256 * 210] -> (written in place) ql uint8 [N, K/2] the values' low four bits in the
    int4 layout, qh uint8 [N, K/4] their high two bits (per 128-weight step 32 bytes, byte j holding from bit 0
    up those of the step's weights 2j, 2j + 64, 2j + 1, 2j + 65), sc int8 [N, K/16], d fp16 [N, K/256]: the
    file's values and its 210 bytes per 256 weights."""
    n, nsb = rows.shape[0], rows.shape[1] // 210
    b = rows.reshape(n * nsb, 210)
    v = _q6_values(b)  # [n * nsb, 256]
    lo = v & 0x0F
    ql.view(n * nsb, QK_K // 2).copy_(lo[:, 0::2] | (lo[:, 1::2] << 4))
    hi = (v >> 4).reshape(n * nsb, 2, 64, 2)  # per step: pairs (even weight, odd weight)
    e, o = hi[..., 0], hi[..., 1]  # [n * nsb, 2, 64]
    qh.view(n * nsb, 2, 32).copy_(e[..., :32] | (e[..., 32:] << 2) | (o[..., :32] << 4) | (o[..., 32:] << 6))
    sc.view(n * nsb, 16).copy_(b[:, 192:208].contiguous().view(torch.int8))
    d.view(n * nsb, 1).copy_(b[:, 208:210].contiguous().view(torch.float16))


@dataclass(frozen=True)
class Q6kRows(_RepackedRows):
    """GGUF Q6_K projections repacked for the CPU kernels (q6_k_rows_repacked), slot dimension first: ql
    uint8 [S, N, K/2], qh uint8 [S, N, K/4], sc int8 [S, N, K/16], d fp16 [S, N, K/256] (as many bytes as
    the file's blocks); cpu_gemv.q6k_linear runs them in 128-weight steps."""

    ql: torch.Tensor
    qh: torch.Tensor
    sc: torch.Tensor
    d: torch.Tensor

    kernel = staticmethod(cpu_gemv.q6k_linear)
    a8_kind = staticmethod(cpu_gemv.a8_q6k)
    write = staticmethod(q6_k_rows_repacked)

    @staticmethod
    def sections(k: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [("ql", torch.uint8, (k // 2,)), ("qh", torch.uint8, (k // 4,)), ("sc", torch.int8, (k // 16,)),
                ("d", torch.float16, (k // QK_K,))]

    def dequant(self, e: int, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of slot e as float32 [hi - lo, K]: d * sc * (q - 32), the float32 operations of
        gguf.quants (and of _q6_k) in the same order."""
        ql, qh, sc, d = (t[e, lo:hi] for t in (self.ql, self.qh, self.sc, self.d))
        r, k = ql.shape[0], 2 * ql.shape[1]
        low = torch.stack([ql & 0x0F, ql >> 4], dim=-1).reshape(r, k)
        h = qh.reshape(r, k // 128, 32)
        even = torch.cat([h & 3, (h >> 2) & 3], dim=-1)  # [r, steps, 64] the even weights' high bits
        odd = torch.cat([(h >> 4) & 3, (h >> 6) & 3], dim=-1)
        q = (low | (torch.stack([even, odd], dim=-1).reshape(r, k) << 4)).to(torch.int8) - 32
        dl = d.float().repeat_interleave(16, dim=1) * sc.float()  # [r, K/16]
        return (dl[..., None] * q.reshape(r, k // 16, 16).float()).reshape(r, k)


REPACKED = {"Q4_K": Q4kRows, "Q6_K": Q6kRows}  # the block types a copy into RAM repacks


@dataclass
class GgufRamPool(GgufPool):
    """A GGUF pool copied into RAM with its Q4_K / Q6_K projections repacked (REPACKED; k13: gate and up as
    one, k2: down; None where that projection has another type, kept as the file's blocks in w13 / w3 / w2).
    CPU only (the fused kernel reads the file's layout)."""

    k13: _RepackedRows | None = None
    k2: _RepackedRows | None = None

    @classmethod
    def copy_of(cls, pool: GgufPool, alloc: Callable = hostmem.empty) -> "GgufRamPool":
        t1, t3, t2 = (t.name for t in pool.types)
        H, I = pool.hidden, pool.inter
        k13 = REPACKED[t1].repack([pool.w13, pool.w3], H, alloc) if t1 == t3 and t1 in REPACKED else None
        k2 = REPACKED[t2].repack([pool.w2], I, alloc) if t2 in REPACKED else None
        w13, w3 = (k13.values, None) if k13 is not None else (_ram_copy(pool.w13, alloc), _ram_copy(pool.w3, alloc))
        w2 = k2.values if k2 is not None else _ram_copy(pool.w2, alloc)
        return cls(H, I, w13, w2, w3=w3, types=pool.types, k13=k13, k2=k2)

    def kernel_format(self, which: str) -> int:
        return WEIGHT_NONE

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        k = self.k13 if which == "w13" else self.k2
        if k is None:
            return super().dequant_projection(which, slot)
        return k.dequant(slot, 0, k.rows)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU on x [n, H] -> [n, H]; repacked projections by Q4kRows.linear, the others as GgufPool runs them."""
        t1, t3, t2 = self.types
        if self.k13 is not None:
            gate, up = self.k13.linear(slot, x).chunk(2, dim=-1)
        elif t1 == t3 and _kernel_takes(t1, self.w13[slot], self.hidden, x):
            gate, up = cpu_gemv.gguf_linear(x, [self.w13[slot], self.w3[slot]], t1.name).chunk(2, dim=-1)
        else:
            gate, up = _tiled(t1, self.w13[slot], self.hidden, x), _tiled(t3, self.w3[slot], self.hidden, x)
        h = torch.nn.functional.silu(gate) * up
        return self.k2.linear(slot, h) if self.k2 is not None else _tiled(t2, self.w2[slot], self.inter, h)

    def a8_expert(self, slot: int, x: torch.Tensor) -> tuple[cpu_gemv.A8Projection, ...] | None:
        t1, t3, t2 = self.types
        if not (cpu_gemv.int8_activations(x, self.hidden) and cpu_gemv.int8_activations(x, self.inter)):
            return None
        if self.k13 is not None:
            w13 = self.k13.a8(slot)
        else:
            w13 = cpu_gemv.a8_gguf([self.w13[slot], self.w3[slot]], t1.name) if t1 == t3 else None
        w2 = self.k2.a8(slot) if self.k2 is not None else cpu_gemv.a8_gguf([self.w2[slot]], t2.name)
        return None if w13 is None or w2 is None else (w13, w2)


def _kernel_takes(t: BlockType, q: torch.Tensor, k: int, x: torch.Tensor) -> bool:
    """Whether the compiled CPU kernel runs x [n, K] against rows q of type t (see _tiled)."""
    return (x.device.type == "cpu" and x.shape[0] <= cpu_gemv.QUANT_MAX_ROWS and q.is_contiguous()
            and cpu_gemv.gguf_runs(t.name, x, k))


def _tiled(t: BlockType, q: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
    """x [n, K] @ dequant(q [N, rb]).T -> [n, N]: the compiled CPU kernel reading the blocks in place
    (Q8_0 / Q4_0, and MXFP4 with int8 activations; a few rows), else one dequantized tile of output rows
    at a time."""
    if _kernel_takes(t, q, k, x):
        return cpu_gemv.gguf_linear(x, q, t.name)
    n = q.shape[0]
    if n <= TILE_ROWS:
        return x @ t.dequantize(q, k).to(x.dtype).t()
    return torch.cat([x @ t.dequantize(q[i:i + TILE_ROWS], k).to(x.dtype).t() for i in range(0, n, TILE_ROWS)], dim=-1)


class GgufFormat(PackedFormat):
    """Experts in GGUF block types, gate / up / down each its own (see the module docstring)."""

    moe_backends = ("loop",)
    section_align = 1  # a row is the file's bytes, back to back, unpadded

    def __init__(self, types: tuple[str, str, str], compute_dtype: torch.dtype | None = None, group_size: int = 128):
        super().__init__(compute_dtype, group_size)
        self.types = tuple(BLOCK_TYPES[t] for t in types)
        self.name = gguf_format_name(tuple(types))
        self.moe_backends = ("loop",) if self.triton_problem() else ("loop", "triton")

    def triton_problem(self, where: str = "") -> str | None:
        """Why moe_backend 'triton' cannot run these experts (one line), or None."""
        return gguf_triton_problem(tuple(t.name for t in self.types), where)

    def check_shape(self, hidden: int, inter: int) -> None:
        """ValueError unless every projection's input dimension is a whole number of blocks."""
        for t, k, what in ((self.types[0], hidden, "gate"), (self.types[1], hidden, "up"), (self.types[2], inter, "down")):
            if k % t.block:
                raise ValueError(f"{what} experts of type {t.name} need an input dimension divisible by {t.block}, "
                                 f"got {k}")

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        t1, t3, t2 = self.types
        return [("w1", torch.uint8, (inter, t1.row_bytes(hidden))), ("w3", torch.uint8, (inter, t3.row_bytes(hidden))),
                ("w2", torch.uint8, (hidden, t2.row_bytes(inter)))]

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return sum(sec.nbytes for sec in self.layout(hidden, inter))

    def file_bytes(self, hidden: int, inter: int) -> int:
        """Bytes of one expert in the file (= expert_bytes: rows are unpadded)."""
        return self.expert_bytes(hidden, inter)

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"expert format {self.name!r} is read from GGUF files as stored; this runtime "
                                  "does not quantize to GGUF types")

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> GgufPool:
        v = self.views(rows, hidden, inter)
        return GgufPool(hidden, inter, v["w1"], v["w2"], w3=v["w3"], types=self.types)

    def tensor_pool(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, hidden: int, inter: int) -> GgufPool:
        """A pool straight over the file's expert tensors (uint8 gate / up [S, I, rb(H)], down [S, H, rb(I)],
        e.g. views of its memory map): no copy."""
        return GgufPool(hidden, inter, w1, w2, w3=w3, types=self.types)

    def cpu_pool(self, pool: WeightPool, dtype: torch.dtype) -> Any:
        """The pool itself (its ffn runs the GGUF kernels, else dequantizes a tile and multiplies), or, for
        Q4_0 experts copied into RAM as int4 (GgufPool.in_ram), the int4 format's CPU preparation."""
        return CpuQuantPool(pool, dtype) if isinstance(pool, Int4Pool) else pool

    def with_bias(self, dtype: torch.dtype, act: Any = None) -> "GgufBiasedFormat":
        """These block types with the experts' biases in the row (GgufBiasedFormat)."""
        return GgufBiasedFormat(tuple(t.name for t in self.types), dtype, act, self.compute_dtype, self.group_size)


BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class GgufBiasedPool(GgufPool):
    """A GgufPool whose experts carry biases (b1, b3 [S, I], b2 [S, H], the file's float dtype) and run
    their own activation (`act`, e.g. kernels.ClampedSwiGLU; None: SwiGLU): GPT-OSS in GGUF. The fused
    kernel has neither, so it runs on the loop backend only."""

    b1: torch.Tensor | None = None
    b3: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    act: Any = None

    loop_only = True

    def kernel_format(self, which: str) -> int:
        return WEIGHT_NONE

    def kernel_refusal(self) -> str | None:
        return "GGUF experts with biases (GPT-OSS) run on moe_backend 'loop'"

    def a8_expert(self, slot: int, x: torch.Tensor) -> None:
        return None  # biases and its own activation: ffn runs it

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, H]: gate and up plus their biases, the activation, down plus its bias, a tile
        of dequantized output rows at a time (_tiled)."""
        t1, t3, t2 = self.types
        gate = _tiled(t1, self.w13[slot], self.hidden, x) + self.b1[slot].to(x.dtype)
        up = _tiled(t3, self.w3[slot], self.hidden, x) + self.b3[slot].to(x.dtype)
        h = torch.nn.functional.silu(gate) * up if self.act is None else self.act(gate, up)
        return _tiled(t2, self.w2[slot], self.inter, h) + self.b2[slot].to(x.dtype)


class GgufBiasedFormat(GgufFormat):
    """GGUF experts with biases (llama.cpp's gpt-oss: ffn_{gate,up,down}_exps.bias [E, N] beside the
    blocks): a row is the biases b1 [I], b3 [I], b2 [H] in the file's float dtype (first, so that they
    are aligned views), then the gate, up and down blocks as GgufFormat lays them out. The host store
    reads all six from the file's map (GgufCheckpoint.expert_tensors, in this order). Loop backend only;
    `act` the experts' activation (None: SwiGLU). Its name is GgufFormat's: the biases are the file's."""

    moe_backends = ("loop",)

    def __init__(self, types: tuple[str, str, str], bias_dtype: torch.dtype = torch.float32, act: Any = None,
                 compute_dtype: torch.dtype | None = None, group_size: int = 128):
        super().__init__(types, compute_dtype, group_size)
        if bias_dtype not in BIAS_DTYPES:
            raise ValueError(f"{self.name}: expert biases of dtype {bias_dtype} are not supported; one of "
                             f"{[str(d) for d in BIAS_DTYPES]}")
        self.bias_dtype, self.act = bias_dtype, act
        self.moe_backends = ("loop",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, bias {str(self.bias_dtype).removeprefix('torch.')})"

    @property
    def bias(self) -> bool:
        """Rows carry the experts' biases."""
        return True

    def with_bias(self, dtype: torch.dtype, act: Any = None) -> "GgufBiasedFormat":
        out = copy.copy(self)
        out.bias_dtype, out.act = dtype, act
        return out

    def triton_problem(self, where: str = "") -> str | None:
        return f"GGUF experts{where} with biases (GPT-OSS) run on moe_backend 'loop' only"

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        dt = self.bias_dtype
        return [("b1", dt, (inter,)), ("b3", dt, (inter,)), ("b2", dt, (hidden,)), *super().section_specs(hidden, inter)]

    def expert_bytes(self, hidden: int, inter: int) -> int:
        """One row rounded up to 16 bytes, so the bias sections of every slot of a pool are aligned."""
        return -(-super().expert_bytes(hidden, inter) // 16) * 16

    def file_bytes(self, hidden: int, inter: int) -> int:
        return sum(sec.nbytes for sec in self.layout(hidden, inter))

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> GgufBiasedPool:
        v = self.views(rows, hidden, inter)
        return GgufBiasedPool(hidden, inter, v["w1"], v["w2"], w3=v["w3"], types=self.types, b1=v["b1"], b3=v["b3"],
                              b2=v["b2"], act=self.act)

    def tensor_pool(self, *args: Any) -> GgufBiasedPool:
        """A pool straight over the file's tensors: b1, b3, b2, w1, w3, w2 (layout order), hidden, inter."""
        b1, b3, b2, w1, w3, w2, hidden, inter = args
        return GgufBiasedPool(hidden, inter, w1, w2, w3=w3, types=self.types, b1=b1, b3=b3, b2=b2, act=self.act)


class GgufLayersFormat(ExpertFormat):
    """A GGUF file whose layers store their experts in different block types: one GgufFormat per layer
    (per_layer), expert_bytes the largest layer's (what one device slot holds). The store, the cache and
    the runners ask each layer's format for its rows and views; this object itself has no row layout."""

    quantized = True
    row_dtype = torch.uint8
    moe_backends = ("loop",)

    def __init__(self, layers: list[tuple[str, str, str]], compute_dtype: torch.dtype | None = None,
                 group_size: int = 128):
        super().__init__(compute_dtype, group_size)
        made: dict[tuple[str, str, str], GgufFormat] = {}
        self.layers = [made.setdefault(tuple(t), GgufFormat(tuple(t), compute_dtype, group_size)) for t in layers]
        self.name = gguf_layers_name([tuple(t) for t in layers])
        self.moe_backends = ("loop",) if self.triton_problem() else ("loop", "triton")  # each layer its own flags

    def triton_problem(self) -> str | None:
        """The first layer whose experts moe_backend 'triton' cannot run, as one line, or None."""
        return next(filter(None, (f.triton_problem(f" of layer {l}") for l, f in enumerate(self.layers))), None)

    def per_layer(self, num_layers: int) -> list[ExpertFormat]:
        if num_layers != len(self.layers):
            raise ValueError(f"expert format {self.name!r} describes {len(self.layers)} layers, the model has "
                             f"{num_layers}")
        return list(self.layers)

    def check_shape(self, hidden: int, inter: int) -> None:
        for f in dict.fromkeys(self.layers):
            f.check_shape(hidden, inter)

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return max(f.expert_bytes(hidden, inter) for f in self.layers)

    def file_bytes(self, hidden: int, inter: int) -> int:
        """Bytes of one expert of the largest layer."""
        return self.expert_bytes(hidden, inter)

    @property
    def bias(self) -> bool:
        """Whether the layers' rows carry the experts' biases (GgufBiasedFormat)."""
        return isinstance(self.layers[0], GgufBiasedFormat)

    @property
    def bias_dtype(self) -> torch.dtype | None:
        return getattr(self.layers[0], "bias_dtype", None)

    def with_bias(self, dtype: torch.dtype, act: Any = None) -> "GgufLayersFormat":
        """Every layer's format with the experts' biases (GgufBiasedFormat)."""
        out = copy.copy(self)
        made: dict[int, GgufBiasedFormat] = {}
        out.layers = [made.setdefault(id(f), f.with_bias(dtype, act)) for f in self.layers]
        out.moe_backends = ("loop",)
        return out

    def _per_layer_only(self, what: str):
        raise NotImplementedError(f"expert format {self.name!r} differs between layers: {what} per layer "
                                  "(per_layer())")

    def pack(self, w1, w3, w2):
        raise NotImplementedError(f"expert format {self.name!r} is read from GGUF files as stored; this runtime "
                                  "does not quantize to GGUF types")

    def write(self, row, packed, hidden, inter):
        self._per_layer_only("rows are written")

    def pool_views(self, rows, hidden, inter):
        self._per_layer_only("pool views are made")
