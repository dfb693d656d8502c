"""The expert format strategy: how experts are stored (host store rows, slot pool rows), what one
weighs, how a float expert becomes one, and which ops run it (torch reference, CPU op, Triton flag).

An expert is w1, w3 [I, H] and w2 [H, I]. A format owns:
  expert_bytes(H, I)             the one formula for the bytes of one expert (store, link, plan, simulator)
  row_dtype, row_length(H, I)    the host layout: one contiguous row per expert, so one copy moves one
  pack(w1, w3, w2)               a float expert -> this format's tensors (quantized as it is stored)
  write(row, packed, H, I)       those tensors into one row; put() = pack + write
  pool_views(rows, H, I)         rows [S, row_length] -> a kernels WeightPool: its weight_format is the
                                 fused kernel's WEIGHT_FORMAT flag, its dequant the torch reference
  cpu_pool(pool, dtype)          the pool prepared for the CPU (its weight-only op where it has one)
  per_layer(L)                   the format of each of L layers ([self] * L; a GGUF file whose layers
                                 store experts in different block types gives one per layer)
The format is chosen once at load (formats.get_format / choose_format); the hot path only calls these
methods. A new format is one module with a subclass (PackedFormat for sectioned byte rows: block
formats override section_specs and, where their size is not the sections', expert_bytes) plus its tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.pool import WeightPool
from ..kernels.quant_cpu import CpuQuantPool

DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (32, 64, 128)  # group sizes the grouped formats are tested with
ALIGN = 16  # every section of a packed row starts on this byte boundary; rows are padded to it


def align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class ExpertFormat(ABC):
    """One expert storage format (see the module docstring)."""

    name: str = ""
    quantized: bool = False  # rows are packed bytes, not weights in the compute dtype
    runnable: bool = True  # False: a size for projections only (simulate, info)
    moe_backends: tuple[str, ...] = ("loop", "triton", "grouped_mm")  # backends that run its pools

    def __init__(self, compute_dtype: torch.dtype | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.compute_dtype = compute_dtype
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- size and layout --------------------------------------------------------------------------
    @abstractmethod
    def expert_bytes(self, hidden: int, inter: int) -> int:
        """Bytes of one expert as stored and copied (weights plus scales/zeros and padding)."""

    @property
    @abstractmethod
    def row_dtype(self) -> torch.dtype:
        """The dtype of a host-store row."""

    def row_length(self, hidden: int, inter: int) -> int:
        """Elements of row_dtype in one expert's row."""
        return self.expert_bytes(hidden, inter) // torch.tensor([], dtype=self.row_dtype).element_size()

    # --- packing ----------------------------------------------------------------------------------
    @abstractmethod
    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """One float expert (w1, w3 [I, H]; w2 [H, I]) -> this format's tensors by name."""

    @abstractmethod
    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        """Write pack()'s tensors (or the same tensors read from a checkpoint) into one row."""

    def put(self, row: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, hidden: int,
            inter: int) -> None:
        """Store one float expert into one row."""
        self.write(row, self.pack(w1, w3, w2), hidden, inter)

    # --- running ----------------------------------------------------------------------------------
    @abstractmethod
    def pool_views(self, rows: torch.Tensor, hidden: int, inter: int) -> WeightPool:
        """rows [S, row_length] (host store or device slot pool) -> the views the kernels read."""

    def cpu_pool(self, pool: WeightPool, dtype: torch.dtype) -> Any:
        """The pool prepared to run on the CPU in `dtype` (an object with ffn(slot, x) and extra_bytes):
        the pool itself unless the format has a CPU weight-only op."""
        return pool

    def per_layer(self, num_layers: int) -> list["ExpertFormat"]:
        """The format of each layer's experts: this one in every layer (a per-layer format overrides it;
        expert_bytes is then the largest layer's, what one slot of the device pool holds)."""
        return [self] * num_layers


@dataclass(frozen=True)
class Section:
    """One tensor inside a packed expert row: `offset` bytes in, `shape` of `dtype`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n

    def view(self, rows: torch.Tensor) -> torch.Tensor:
        """rows uint8 [S, B] -> this section as [S, *shape] of its dtype (a view)."""
        part = rows[:, self.offset: self.offset + self.nbytes]
        return part.view(self.dtype).view(rows.shape[0], *self.shape)


class PackedFormat(ExpertFormat):
    """A format whose expert is one uint8 row of sections, each on a 16-byte boundary, the row padded to
    16 bytes, so every section is an aligned view of the row (and of a slot pool's rows)."""

    quantized = True
    row_dtype = torch.uint8
    # each section starts on a multiple of this many bytes; 1: back to back, unpadded (a row that is a
    # file's bytes as stored, GGUF and the hub formats)
    section_align: int = ALIGN

    @abstractmethod
    def section_specs(self, hidden: int, inter: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of each section, in row order."""

    def layout(self, hidden: int, inter: int) -> list[Section]:
        """The sections of one expert row, in order, with their offsets."""
        out, offset = [], 0
        for name, dt, shape in self.section_specs(hidden, inter):
            sec = Section(name, dt, shape, offset)
            out.append(sec)
            offset = align(offset + sec.nbytes, self.section_align)
        return out

    def expert_bytes(self, hidden: int, inter: int) -> int:
        last = self.layout(hidden, inter)[-1]
        return align(last.offset + last.nbytes)

    def write(self, row: torch.Tensor, packed: dict[str, torch.Tensor], hidden: int, inter: int) -> None:
        row.zero_()  # padding bytes too
        for sec in self.layout(hidden, inter):
            sec.view(row[None])[0].copy_(packed[sec.name])

    def views(self, rows: torch.Tensor, hidden: int, inter: int) -> dict[str, torch.Tensor]:
        """rows uint8 [S, B] -> every section as [S, *shape] (views), by name."""
        return {sec.name: sec.view(rows) for sec in self.layout(hidden, inter)}

    def cpu_pool(self, pool: WeightPool, dtype: torch.dtype) -> CpuQuantPool:
        return CpuQuantPool(pool, dtype)


def safe_scale(s: torch.Tensor) -> torch.Tensor:
    """fp16 scales, with 1 where a row/group is all zeros (any scale then gives q = 0 -> w = 0)."""
    s = s.to(torch.float16)
    return torch.where(s == 0, torch.ones_like(s), s)
