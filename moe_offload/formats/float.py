"""Experts kept in the compute dtype (fp32 / bf16 / fp16): no packing, no scales.

Row layout: w13 [2I, H] (w1 rows, then w3 rows) then w2 [H, I], flattened, in the row dtype; 2 or 4
bytes per weight, no padding. Every backend runs it (the fused kernel's WEIGHT_FLOAT variant).

Experts with biases (GPT-OSS: ModelConfig.expert_bias) add two sections after w2: b13 [2I] (w1's bias,
then w3's) and b2 [H], so the biases travel with their expert (host store row -> device slot row). Such a
format (bias=True) also carries the experts' activation (`act`: kernels.ClampedSwiGLU, or None for SwiGLU)
into the pools it builds (kernels.BiasedFloatPool); they run on the loop backend only.

A row's sections (layout()): w1 [I, H], w3 [I, H], w2 [H, I] (then b13 [2I], b2 [H]), back to back. A
safetensors file whose experts are one tensor per weight in this dtype holds exactly those bytes, so the
host store can read them in place from the file's memory map (offload/store.py): each row the pieces of
the file in layout() order, and tensor_pool() a pool straight over the file's tensors (SplitFloatPool:
w1 and w3 are not adjacent in the file, so one expert's [w1; w3] is gathered when it runs, on the loop
backend; a device slot's row, copied from those pieces, is the usual [w13 | w2] and runs everywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.pool import BiasedFloatPool, FloatPool, WeightPool
from ..kernels.reference import expert_ffn
from .base import DEFAULT_GROUP_SIZE, ExpertFormat, Section

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gate_up(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """[w1; w3] [2I, H]: a view of their memory where w3 follows w1 in it, else a concatenated copy."""
    if (w1.is_contiguous() and w3.is_contiguous() and w1.dtype == w3.dtype and w1.shape[1:] == w3.shape[1:]
            and w1.untyped_storage().data_ptr() == w3.untyped_storage().data_ptr()
            and w3.storage_offset() == w1.storage_offset() + w1.numel()):
        return w1.as_strided((w1.shape[0] + w3.shape[0], *w1.shape[1:]), w1.stride())
    return torch.cat([w1, w3])


@dataclass
class SplitFloatPool(WeightPool):
    """Float experts whose three weights are separate tensors (a safetensors file's, read in place):
    w13 holds w1 [S, I, H], w3 [S, I, H], w2 [S, H, I] (tensors, or rows.Stacked of one tensor per
    expert), b13 [S, 2I] / b2 [S, H] where the experts have biases. An expert runs as a row of the
    format runs, [w1; w3] then expert_ffn, so its results are those of the copied row's bit for bit:
    [w1; w3] is a view where the file stores up right after gate (safetensors orders a layer's tensors
    by name: gate_proj, up_proj are adjacent; Mixtral's w1, w2, w3 are not), else gathered (2 I H
    weights copied per call). The loop backend only (no kernel reads separate tensors)."""

    w3: Any = None
    b13: Any = None
    b2: Any = None
    act: Any = None

    weight_format: ClassVar[int] = -1  # no fused-kernel flag (kernels.pool): the loop backend only
    loop_only: ClassVar[bool] = True

    def dequant_projection(self, which: str, slot: int) -> torch.Tensor:
        if which == "w13":
            return gate_up(self.w13[slot], self.w3[slot])
        return self.w2[slot]

    def ffn(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        b13 = None if self.b13 is None else self.b13[slot]
        b2 = None if self.b2 is None else self.b2[slot]
        return expert_ffn(x, self.dequant_projection("w13", slot), self.w2[slot], b13, b2, self.act)


class FloatFormat(ExpertFormat):
    """Experts as float weights in `dtype` (also the compute dtype); bias: with their biases' sections,
    run by `act` (see the module docstring)."""

    quantized = False

    def __init__(self, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE, *, bias: bool = False,
                 act: Any = None):
        super().__init__(dtype, group_size)
        names = {dt: name for name, dt in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"float expert format needs one of {list(FLOAT_DTYPES)}, got {dtype}")
        self.dtype, self.name = dtype, names[dtype]
        self.bias, self.act = bias, act
        if bias or act is not None:
            self.moe_backends = ("loop",)

    def __repr__(self) -> str:
        return f"FloatFormat({self.name!r}, bias)" if self.bias else super().__repr__()

    @property
    def row_dtype(self) -> torch.dtype:
        return self.dtype

    def layout(self, hidden: int, inter: int) -> list[Section]:
        """The sections of one row, in order, with their byte offsets: w1, w3, w2 (and b13, b2)."""
        specs = [("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))]
        if self.bias:
            specs += [("b13", (2 * inter,)), ("b2", (hidden,))]
        out, offset = [], 0
        for name, shape in specs:
            out.append(Section(name, self.dtype, shape, offset))
            offset += out[-1].nbytes
        return out

    def tensor_pool(self, *args: Any) -> SplitFloatPool:
        """A pool straight over the file's tensors (no copy): the sections of layout() in order, each
        [S, *shape] (a tensor or rows.Stacked), then hidden, inter (GgufFormat.tensor_pool's convention)."""
        *stacks, hidden, inter = args
        v = {sec.name: t for sec, t in zip(self.layout(hidden, inter), stacks)}
        return SplitFloatPool(hidden, inter, v["w1"], v["w2"], w3=v["w3"], b13=v.get("b13"), b2=v.get("b2"),
                              act=self.act)

    def row_elems(self, hidden: int, inter: int) -> int:
        """Elements of one row: the three weights, and the biases [2I] + [H] where the format has them."""
        return 3 * hidden * inter + ((2 * inter + hidden) if self.bias else 0)

    def expert_bytes(self, hidden: int, inter: int) -> int:
        return self.row_elems(hidden, inter) * torch.tensor([], dtype=self.dtype).element_size()

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
             bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = {"w13": torch.cat([w1, w3]).to(self.dtype), "w2": w2.to(self.dtype)}
        if self.bias:
            out.update(b13=bias[0].to(self.dtype), b2=bias[1].to(self.dtype))
        return out

    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        parts = self._split(row, hidden, inter)
        parts[0].copy_(packed["w13"])
        parts[1].copy_(packed["w2"])
        if self.bias:
            parts[2].copy_(packed["b13"])
            parts[3].copy_(packed["b2"])

    def put(self, row: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, hidden: int,
            inter: int, bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One float expert into one row, copied in place (no concatenated temporary); bias (b13 [2I],
        b2 [H]) is required exactly when the format has bias sections."""
        if self.bias != (bias is not None):
            raise ValueError(f"{self!r}: expert biases {'missing' if self.bias else 'given to a format without them'}")
        parts = self._split(row, hidden, inter)
        parts[0][:inter].copy_(w1)
        parts[0][inter:].copy_(w3)
        parts[1].copy_(w2)
        if self.bias:
            parts[2].copy_(bias[0])
            parts[3].copy_(bias[1])

    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> FloatPool:
        s, n13, n2 = rows.shape[0], 2 * inter * hidden, hidden * inter
        w13 = rows[:, :n13].view(s, 2 * inter, hidden)
        w2 = rows[:, n13:n13 + n2].view(s, hidden, inter)
        if not self.bias and self.act is None:
            return FloatPool(hidden, inter, w13, w2)
        b13 = rows[:, n13 + n2:n13 + n2 + 2 * inter] if self.bias else None  # [S, 2I]
        b2 = rows[:, n13 + n2 + 2 * inter:] if self.bias else None  # [S, H]
        return BiasedFloatPool(hidden, inter, w13, w2, b13=b13, b2=b2, act=self.act)

    def _split(self, row: torch.Tensor, hidden: int, inter: int) -> list[torch.Tensor]:
        """One row -> views w13 [2I, H], w2 [H, I] (and b13 [2I], b2 [H] with biases)."""
        n13, n2 = 2 * inter * hidden, hidden * inter
        out = [row[:n13].view(2 * inter, hidden), row[n13:n13 + n2].view(hidden, inter)]
        if self.bias:
            out += [row[n13 + n2:n13 + n2 + 2 * inter], row[n13 + n2 + 2 * inter:n13 + n2 + 2 * inter + hidden]]
        return out
