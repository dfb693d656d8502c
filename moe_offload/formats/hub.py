"""Expert formats read from published quantized safetensors checkpoints, kept as the file stores them.

A hub format (GPTQ, AWQ, FP8 block, MXFP4, compressed-tensors pack-quantized) describes one matrix
[N out, K in] as the file's tensors (`matrix_specs`: suffix, dtype, shape; the file names them
`<module>.<suffix>`, e.g. `...experts.3.w1.qweight`) and dequantizes them (`dequant_matrix`, float32
[N, K]). One expert row is the file's tensors of w1, w3 and w2 (a fused format: w13 and w2) copied
byte for byte, back to back without padding (sections ordered by element size, widest first, so every
section is an aligned view; the row is rounded up to 4 bytes, which real shapes never need): host
store bytes are the file's expert bytes, never a dequantized copy. The host store can therefore read
them in place from a safetensors file's memory map (offload/store.py): a row is the pieces of the file
in layout() order, and tensor_pool() builds the pool straight over the file's tensors.

Running: the loop backend dequantizes a tile of output rows of one file matrix in float32, casts it
to the compute dtype and multiplies, tile after tile (HubPool.ffn -> dequant_linear; kernels.pool's
DEQUANT_TILE_ROWS rows, rounded to the format's row multiple), so a call never holds a whole dequantized
projection. Each format says how its tensors follow the output rows (row_slices: GPTQ's qzeros pack 8
output columns per word, an FP8 scale covers bn rows, ...); a tile is the file tensors sliced to its rows,
dequantized by the same dequant_matrix, so its values are the whole projection's rows bit for bit. The
fused Triton kernel has no flag for these formats: choose_format refuses moe_backend 'triton' in one line.

Experts with biases (GPT-OSS: ModelConfig.expert_bias) carry them in their row too, as the file stores
them (with_bias(dtype, act)): sections b13 [2I] (a fused format: the file's interleaved gate_up bias;
else w1's bias, then w3's) and b2 [H], in the file's dtype, so the host store and the device slots hold
the file's expert bytes, biases included. Such a format also carries the experts' activation (`act`:
kernels.ClampedSwiGLU, or None for SwiGLU) into its pools, which add the biases (cast to the compute
dtype) and run that activation (HubPool.ffn).

Format names carry every parameter, so the name alone rebuilds the format (get_format): 'gptq:4,g128,
sym,act', 'awq:4,g128', 'fp8:128x128', 'mxfp4', 'ct:4,g64,asym'; a scale dtype other than the format's
usual one is appended (',bf16'). A new hub format: a HubFormat subclass with PREFIX, from_name,
matrix_specs, row_slices and dequant_matrix, registered in HUB_FORMATS (formats/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import copy
import math

import torch
import torch.nn.functional as F

from ..kernels import pool as weight_pool
from ..kernels.pool import WeightPool
from ..kernels.reference import linear
from .base import PackedFormat

WEIGHT_HUB = -1  # no fused-kernel flag: the loop backend only
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SAFETENSORS_DTYPE = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                     torch.uint8: "U8", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}


def dtype_label(dt: torch.dtype) -> str:
    return {v: k for k, v in SCALE_DTYPES.items()}[dt]


def parse_tokens(name: str, prefix: str) -> list[str]:
    return [t for t in name.removeprefix(prefix).split(",") if t]


def scale_token(tokens: list[str], default: torch.dtype, name: str) -> tuple[torch.dtype, list[str]]:
    """The scale dtype named among `tokens` ('fp16' / 'bf16' / 'fp32'), or `default`; the rest."""
    found = [t for t in tokens if t in SCALE_DTYPES]
    if len(found) > 1:
        raise ValueError(f"expert format {name!r} names more than one scale dtype")
    return (SCALE_DTYPES[found[0]] if found else default), [t for t in tokens if t not in SCALE_DTYPES]


def gather_cols(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v [G, N] per group, idx [K] the group of each input k -> [N, K] (v[idx[k], n])."""
    return v[idx.long()].t()


@dataclass
class HubPool(WeightPool):
    """Views of a hub format's rows: `secs` every section [S, *shape] by name (w13 / w2 hold one of
    them, for the slot count and device); `fmt` the format that dequantizes them."""

    fmt: Any = None
    secs: dict[str, torch.Tensor] = field(default_factory=dict)
    b13: torch.Tensor | None = None  # [S, 2I] as the file stores it (fused: gate and up interleaved)
    b2: torch.Tensor | None = None  # [S, H]
    act: Any = None  # the experts' activation (None: SwiGLU)
    weight_format: ClassVar[int] = WEIGHT_HUB
    loop_only: ClassVar[bool] = True  # no kernel reads these rows

    def matrix(self, w: str, slot: int) -> dict[str, torch.Tensor]:
        """The file's tensors of matrix `w` ('w1', 'w3', 'w2', or 'w13' when fused) of `slot`, by suffix."""
        pre = w + "."
        return {k[len(pre):]: v[slot] for k, v in self.secs.items() if k.startswith(pre)}

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        return self.fmt.dequant_projection(self, which, slot)

    def biases(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b13 [2I]: w1's bias then w3's, b2 [H]) of `slot` in `dtype`, or (None, None) without biases."""
        if self.b13 is None:
            return None, None
        b13 = self.b13[slot]
        if self.fmt.fused_gate_up:
            b13 = deinterleave(b13)
        return b13.to(dtype), self.b2[slot].to(dtype)

    def dequant_rows(self, which: str, slot: int, lo: int, hi: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows lo..hi-1 of projection `which` of `slot` ([hi - lo, K]; 'w13' in [gate rows; up rows]
        order), dequantizing only those rows (rounded out to the format's row multiple) in float32, then cast."""
        return self.fmt.dequant_rows(self, which, slot, lo, hi).to(dtype)

    def dequant_linear(self, which: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] @ W^T -> [n, N] for projection `which` of `slot` ('w13': [gate; up] columns), one tile of
        each file matrix's output rows dequantized at a time (HubFormat.tiled_linear)."""
        return self.fmt.tiled_linear(self, which, slot, x)

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on x [n, H]: the format's CPU kernel where it has one for these rows (kernel_ffn),
        else dequantize a tile of output rows at a time to x's dtype and multiply (dequant_linear), adding
        the biases and running the activation where the experts have their own."""
        fast = self.kernel_ffn(slot, x)
        if fast is not None:
            return fast
        b13, b2 = self.biases(slot, x.dtype)
        gate_up = self.dequant_linear("w13", slot, x)  # [n, 2I]: gate, then up
        if b13 is not None:
            gate_up = gate_up + b13
        gate, up = gate_up.chunk(2, dim=-1)  # [n, I] each
        y = self.dequant_linear("w2", slot, F.silu(gate) * up if self.act is None else self.act(gate, up))
        return y if b2 is None else y + b2

    def kernel_ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """One fused-gate_up expert through the format's kernel_linear (None where it has none): the
        rows stay in the file's order, so gate_up comes out interleaved and meets its bias as stored."""
        if not self.fmt.fused_gate_up:
            return None
        gu = self.fmt.kernel_linear(self, "w13", slot, x)  # [n, 2I]: gate j at 2j, up j at 2j + 1
        if gu is None:
            return None
        if self.b13 is not None:
            gu = gu + self.b13[slot].to(x.dtype)
        gate, up = gu[..., 0::2], gu[..., 1::2]
        h = F.silu(gate) * up if self.act is None else self.act(gate, up)  # [n, I]
        y = self.fmt.kernel_linear(self, "w2", slot, h)
        if y is None:
            y = self.dequant_linear("w2", slot, h)
        return y if self.b2 is None else y + self.b2[slot].to(x.dtype)


class HubFormat(PackedFormat):
    """A published checkpoint's expert tensors, as stored (see the module docstring)."""

    PREFIX: ClassVar[str] = ""
    moe_backends = ("loop",)
    section_align = 1  # a row is the file's bytes, back to back, unpadded
    fused_gate_up = False  # True: one w13 [2I, H] matrix (gate and up rows interleaved: GPT-OSS)
    scale_dtype: torch.dtype = torch.float16
    default_scale_dtype: ClassVar[torch.dtype] = torch.float16
    bias_dtype: torch.dtype | None = None  # with_bias: the experts' biases travel in the row, in this dtype
    act: Any = None  # with_bias: the experts' activation (None: SwiGLU)

    def __repr__(self) -> str:
        if self.bias_dtype is None:
            return super().__repr__()
        return f"{type(self).__name__}({self.name!r}, bias {str(self.bias_dtype).removeprefix('torch.')})"

    @property
    def bias(self) -> bool:
        """Whether rows carry the experts' biases (b13, b2 sections)."""
        return self.bias_dtype is not None

    def with_bias(self, dtype: torch.dtype, act: Any = None) -> "HubFormat":
        """This format with bias sections b13 [2I], b2 [H] of `dtype` (as the file stores the biases) and
        the experts' activation `act` (see the module docstring)."""
        if dtype not in SCALE_DTYPES.values():
            raise ValueError(f"{self.name}: expert biases of dtype {dtype} are not supported; one of "
                             f"{list(SCALE_DTYPES)}")
        out = copy.copy(self)
        out.bias_dtype, out.act = dtype, act
        return out

    # --- to override -----------------------------------------------------------------------------------
    def matrix_specs(self, n: int, k: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(suffix, dtype, shape) of each file tensor of one matrix [n out, k in]."""
        raise NotImplementedError

    def dequant_matrix(self, t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
        """The file's tensors of one matrix (by suffix) -> float32 [n, k]."""
        raise NotImplementedError

    def row_slices(self, n: int, k: int) -> dict[str, tuple[int, int]]:
        """How the file tensors of one matrix [n out, k in] follow its output rows: suffix -> (dim, rows):
        index j along `dim` holds output rows j * rows .. (j + 1) * rows - 1 (rows > 1: packed along the
        output). A tensor not named is read whole for any rows (e.g. GPTQ's g_idx)."""
        raise NotImplementedError

    def meta_specs(self, n: int, k: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...], list[int]]]:
        """(suffix, safetensors dtypes, shape, value) of metadata tensors checked at load, not stored."""
        return []

    def check_matrix(self, t: dict[str, torch.Tensor], n: int, k: int) -> str | None:
        """What is wrong with the values of one matrix's tensors (e.g. an index out of range), or None."""
        return None

    def zero_specs(self, n: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
        """(suffix, shape) of float tensors a file may carry beside one matrix [n out, k in] that must be
        all zeros (read and checked at load, not stored): e.g. the zero `.bias` AutoGPTQ wrote for
        bias-free linears. Optional: a file without them reads the same."""
        return []

    @staticmethod
    def zero_problem(sfx: str, t: torch.Tensor, what: str = "MoE expert") -> str | None:
        """What is wrong with zero_specs tensor `sfx` of a bias-free `what` ('MoE expert', 'linear'): its
        first nonzero value, or None when it is all zeros."""
        if bool((t != 0).any()):
            bad = int((t != 0).reshape(-1).nonzero()[0])
            return (f"{sfx} [{bad}] is {float(t.reshape(-1)[bad])!r}: a nonzero {sfx} on a bias-free {what} "
                    "(only all-zero biases, as AutoGPTQ writes for bias-free layers, are read)")
        return None

    def with_scale_dtype(self, dt: torch.dtype) -> "HubFormat":
        """This format with scales of dtype `dt` (as a file's header says)."""
        if dt not in SCALE_DTYPES.values():
            raise ValueError(f"{self.name}: scales of dtype {dt} are not supported; one of {list(SCALE_DTYPES)}")
        tokens = [t for t in parse_tokens(self.name, self.PREFIX) if t not in SCALE_DTYPES]
        if dt != self.default_scale_dtype:
            tokens.append(dtype_label(dt))
        return type(self).from_name(self.PREFIX + ",".join(tokens), self.compute_dtype, self.group_size)

    @classmethod
    def from_name(cls, name: str, compute_dtype: torch.dtype | None = None, group_size: int = 128) -> "HubFormat":
        raise NotImplementedError

    # --- the expert row --------------------------------------------------------------------------------
    def matrices(self, hidden: int, inter: int) -> list[tuple[str, int, int]]:
        """(name, n, k) of the expert's matrices as the file stores them."""
        if self.fused_gate_up:
            return [("w13", 2 * inter, hidden), ("w2", hidden, inter)]
        return [("w1", inter, hidden), ("w3", inter, hidden), ("w2", hidden, inter)]

    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        specs = [(f"{w}.{sfx}", dt, shape) for w, n, k in self.matrices(hidden, inter)
                 for sfx, dt, shape in self.matrix_specs(n, k)]
        if self.bias_dtype is not None:
            specs += [("b13", self.bias_dtype, (2 * inter,)), ("b2", self.bias_dtype, (hidden,))]
        return sorted(specs, key=lambda s: -torch.tensor([], dtype=s[1]).element_size())  # stable

    def file_bytes(self, hidden: int, inter: int) -> int:
        """Bytes of one expert's tensors in the file."""
        return sum(sec.nbytes for sec in self.layout(hidden, inter))

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return -(-self.file_bytes(hidden, inter) // 4) * 4

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"expert format {self.name!r} is read from checkpoints as stored; this runtime "
                                  "does not quantize to it")

    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        """The file's tensors of one expert (by section name) into its row, byte for byte."""
        secs = self.layout(hidden, inter)
        for sec in secs:
            t = packed[sec.name]
            if t.dtype != sec.dtype or tuple(t.shape) != sec.shape:
                raise ValueError(f"{sec.name} is {list(t.shape)} {t.dtype}, expected {list(sec.shape)} {sec.dtype}")
        end = secs[-1].offset + secs[-1].nbytes
        row[end:].zero_()
        for sec in secs:
            sec.view(row[None])[0].copy_(packed[sec.name])

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> HubPool:
        return self._pool(self.views(rows, hidden, inter), hidden, inter)

    def tensor_pool(self, *args: Any) -> HubPool:
        """A pool straight over the file's tensors (no copy; e.g. views of its memory map): the sections
        of layout() in order, each [S, *shape] (a tensor, or rows.Stacked of one tensor per expert), then
        hidden, inter (GgufFormat.tensor_pool's convention)."""
        *stacks, hidden, inter = args
        return self._pool({sec.name: t for sec, t in zip(self.layout(hidden, inter), stacks)}, hidden, inter)

    def _pool(self, v: dict[str, Any], hidden: int, inter: int) -> HubPool:
        """The pool over every section [S, *shape] by name."""
        first = {w: next(val for key, val in v.items() if key.startswith(w + ".")) for w, _, _ in
                 self.matrices(hidden, inter)}
        return HubPool(hidden, inter, first["w13" if self.fused_gate_up else "w1"], first["w2"], fmt=self, secs=v,
                       b13=v.get("b13"), b2=v.get("b2"), act=self.act)

    def cpu_pool(self, pool: WeightPool, dtype: torch.dtype) -> WeightPool:
        return pool  # its own ffn: dequantize, then matmul

    def kernel_linear(self, pool: HubPool, which: str, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [n, K] @ W^T for matrix `which` of `slot` by a kernel reading the file's tensors in place
        (rows in the file's order), or None where the format has none for x (the default)."""
        return None

    # --- output rows, a tile at a time --------------------------------------------------------------------
    def row_multiple(self, n: int, k: int) -> int:
        """Output rows that slice one matrix [n, k] apart: a tile starts at a multiple of this."""
        return math.lcm(*(rows for _, rows in self.row_slices(n, k).values()))

    def tile_rows(self, n: int, k: int) -> int:
        """Output rows dequantized at a time: kernels.pool.DEQUANT_TILE_ROWS rounded down to the row
        multiple, at least one multiple."""
        m = self.row_multiple(n, k)
        return max(m, weight_pool.DEQUANT_TILE_ROWS // m * m)

    def slice_rows(self, t: dict[str, torch.Tensor], n: int, k: int, lo: int, hi: int,
                   step: int = 1) -> dict[str, torch.Tensor]:
        """The file tensors of output rows lo, lo + step, .. < hi of one matrix (views): lo a multiple of the
        row multiple, hi one too or n; step > 1 only where every tensor holds one index per row."""
        out = dict(t)
        for sfx, (dim, rows) in self.row_slices(n, k).items():
            cut = [slice(None)] * t[sfx].dim()
            cut[dim] = slice(lo // rows, -(-hi // rows), step)
            out[sfx] = t[sfx][tuple(cut)]
        return out

    def dequant_matrix_rows(self, t: dict[str, torch.Tensor], n: int, k: int, lo: int, hi: int,
                            step: int = 1) -> torch.Tensor:
        """Output rows lo, lo + step, .. < hi of one matrix, float32 [len(range(lo, hi, step)), k]: the
        file tensors of those rows dequantized (a range not on the row multiple is widened to it, then cut)."""
        m = self.row_multiple(n, k)
        if step > 1 and m > 1:
            return self.dequant_matrix_rows(t, n, k, lo, hi)[::step]
        a, b = lo // m * m, min(n, -(-hi // m) * m)
        rows = len(range(a, b, step))
        w = self.dequant_matrix(self.slice_rows(t, n, k, a, b, step), rows, k)  # [rows, k]
        return w if (a, b) == (lo, hi) else w[lo - a: hi - a]

    def dequant_rows(self, pool: HubPool, which: str, slot: int, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of projection 'w13' ([gate rows; up rows]) or 'w2' of `slot`, float32 [hi - lo, K]."""
        h, i = pool.hidden, pool.inter
        if which == "w2":
            return self.dequant_matrix_rows(pool.matrix("w2", slot), h, i, lo, hi)
        parts = []
        for half, (a, b) in enumerate([(lo, min(hi, i)), (max(lo, i) - i, hi - i)]):  # gate rows, up rows
            if a >= b:
                continue
            if self.fused_gate_up:  # gate row j is the file's row 2j, up row j the file's row 2j + 1
                parts.append(self.dequant_matrix_rows(pool.matrix("w13", slot), 2 * i, h, 2 * a + half, 2 * b, 2))
            else:
                parts.append(self.dequant_matrix_rows(pool.matrix(("w1", "w3")[half], slot), i, h, a, b))
        if not parts:
            return torch.zeros(0, h, device=pool.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def matrix_linear(self, t: dict[str, torch.Tensor], n: int, k: int, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] @ W^T -> [m, n] for one file matrix, its output rows dequantized tile_rows at a time (in
        x's dtype), in the file's row order."""
        step = self.tile_rows(n, k)
        tiles = []
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            w = self.dequant_matrix(self.slice_rows(t, n, k, lo, hi), hi - lo, k)  # [hi - lo, k] float32
            tiles.append(linear(x, w.to(x.dtype)))
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)

    def tiled_linear(self, pool: HubPool, which: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x [m, K] @ W^T for projection 'w13' (-> [m, 2I]: gate columns, then up) or 'w2' (-> [m, H]) of
        `slot`, a tile of output rows at a time (matrix_linear); fused gate_up is multiplied in the file's
        row order, then its columns de-interleaved."""
        h, i = pool.hidden, pool.inter
        if which == "w2":
            return self.matrix_linear(pool.matrix("w2", slot), h, i, x)
        if self.fused_gate_up:
            y = self.matrix_linear(pool.matrix("w13", slot), 2 * i, h, x)  # [m, 2I]: gate j at 2j, up j at 2j + 1
            return torch.cat([y[..., 0::2], y[..., 1::2]], dim=-1)
        return torch.cat([self.matrix_linear(pool.matrix(w, slot), i, h, x) for w in ("w1", "w3")], dim=-1)

    def dequant_projection(self, pool: HubPool, which: str, slot: int) -> torch.Tensor:
        """Projection 'w13' ([2I, H]: w1 rows, then w3 rows) or 'w2' ([H, I]) of `slot`, float32."""
        h, i = pool.hidden, pool.inter
        if which == "w2":
            return self.dequant_matrix(pool.matrix("w2", slot), h, i)
        if self.fused_gate_up:
            return deinterleave(self.dequant_matrix(pool.matrix("w13", slot), 2 * i, h))
        return torch.cat([self.dequant_matrix(pool.matrix("w1", slot), i, h),
                          self.dequant_matrix(pool.matrix("w3", slot), i, h)])


def deinterleave(w: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's fused gate_up rows [2I, K] (gate, up, gate, up, ...) -> [gate rows; up rows]."""
    return torch.cat([w[0::2], w[1::2]])
