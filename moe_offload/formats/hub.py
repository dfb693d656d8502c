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

Running: the loop backend dequantizes one projection of one expert in float32, casts it to the
compute dtype and multiplies (HubPool.ffn: dequantize-then-matmul, an expert at a time). The fused
Triton kernel has no flag for these formats: choose_format refuses moe_backend 'triton' in one line.

Experts with biases (GPT-OSS: ModelConfig.expert_bias) carry them in their row too, as the file stores
them (with_bias(dtype, act)): sections b13 [2I] (a fused format: the file's interleaved gate_up bias;
else w1's bias, then w3's) and b2 [H], in the file's dtype, so the host store and the device slots hold
the file's expert bytes, biases included. Such a format also carries the experts' activation (`act`:
kernels.ClampedSwiGLU, or None for SwiGLU) into its pools, which add the biases (cast to the compute
dtype) and run that activation (expert_ffn).

Format names carry every parameter, so the name alone rebuilds the format (get_format): 'gptq:4,g128,
sym,act', 'awq:4,g128', 'fp8:128x128', 'mxfp4', 'ct:4,g64,asym'; a scale dtype other than the format's
usual one is appended (',bf16'). A new hub format: a HubFormat subclass with PREFIX, from_name,
matrix_specs and dequant_matrix, registered in HUB_FORMATS (formats/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import copy

import torch
import torch.nn.functional as F

from ..kernels.pool import WeightPool
from ..kernels.reference import expert_ffn
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

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on x [n, H]: the format's CPU kernel where it has one for these rows (kernel_ffn),
        else dequantize each projection to x's dtype, then matmul (adding the biases and running the
        activation where the experts have their own)."""
        fast = self.kernel_ffn(slot, x)
        if fast is not None:
            return fast
        w13, w2 = self.dequant(slot, x.dtype)
        return expert_ffn(x, w13, w2, *self.biases(slot, x.dtype), self.act)

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
            y = F.linear(h, self.dequant_projection("w2", slot).to(x.dtype))
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

    def meta_specs(self, n: int, k: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...], list[int]]]:
        """(suffix, safetensors dtypes, shape, value) of metadata tensors checked at load, not stored."""
        return []

    def check_matrix(self, t: dict[str, torch.Tensor], n: int, k: int) -> str | None:
        """What is wrong with the values of one matrix's tensors (e.g. an index out of range), or None."""
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
