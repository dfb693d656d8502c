"""Expert storage formats, the byte layout of one expert, and the one formula for its size.

An expert is w1, w3 [I, H] and w2 [H, I] (n = 3*H*I weights). Per format:
  fp32 / bf16 / fp16   4 / 2 / 2 bytes per weight: w13 [2I, H] then w2 [H, I], no padding
  int8                 1 byte per weight (symmetric) + an fp16 scale per output row (2I + H rows)
  int4 / int3 / int2   bits/8 bytes per weight, each row packed on its own (ceil(K*bits/8) bytes),
                       + an fp16 scale and an fp16 zero point per group of `group_size` weights
                       along the input dimension: asymmetric, q in [0, 2^bits - 1]
Quantized experts are one uint8 row of sections (see `expert_layout`), each starting on a 16-byte
boundary and the row padded to 16 bytes, so every section is an aligned view of the row.
int4 packs two weights per byte along the input dimension: weight k of a row is the low nibble of
byte k // 2 when k is even, the high nibble when k is odd. Only int8 and int4 are stored and run;
int3 / int2 sizes are for projections (simulate, info).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_GROUP_SIZE = 128
EXPERT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4", "int3", "int2")
QUANT_FORMATS = ("int8", "int4")  # stored in the host tier and run by the kernels
GROUP_SIZES = (32, 64, 128)  # group sizes the int4 kernels are tested with
_FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
ALIGN = 16


@dataclass(frozen=True)
class Section:
    """One tensor inside an expert row: `offset` bytes in, `shape` of `dtype` ('int8', 'uint8', 'fp16')."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 2 if self.dtype == "fp16" else 1
        for d in self.shape:
            n *= d
        return n


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def check_format(fmt: str, group_size: int) -> None:
    """ValueError naming the bad format or group size."""
    if fmt not in EXPERT_FORMATS:
        raise ValueError(f"expert format {fmt!r} is not one of {list(EXPERT_FORMATS)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def expert_layout(hidden: int, inter: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> list[Section]:
    """The sections of one quantized expert row (int formats), in order; [] for float formats."""
    check_format(fmt, group_size)
    if fmt in _FLOAT_BYTES:
        return []
    bits = _INT_BITS[fmt]
    qdt = "int8" if fmt == "int8" else "uint8"
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("qw13", qdt, (2 * inter, -(-hidden * bits // 8))), ("qw2", qdt, (hidden, -(-inter * bits // 8)))]
    if fmt == "int8":
        specs += [("s13", "fp16", (2 * inter,)), ("s2", "fp16", (hidden,))]
    else:
        g13, g2 = -(-hidden // group_size), -(-inter // group_size)
        specs += [("s13", "fp16", (2 * inter, g13)), ("z13", "fp16", (2 * inter, g13)),
                  ("s2", "fp16", (hidden, g2)), ("z2", "fp16", (hidden, g2))]
    out, offset = [], 0
    for name, dt, shape in specs:
        sec = Section(name, dt, shape, offset)
        out.append(sec)
        offset = _align(offset + sec.nbytes)
    return out


def expert_bytes(hidden: int, inter: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one expert (weights plus scales/zeros, as stored and copied) in format `fmt`."""
    check_format(fmt, group_size)
    if fmt in _FLOAT_BYTES:
        return 3 * hidden * inter * _FLOAT_BYTES[fmt]
    last = expert_layout(hidden, inter, fmt, group_size)[-1]
    return _align(last.offset + last.nbytes)
