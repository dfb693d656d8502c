"""Expert storage formats and the one formula for their byte sizes.

An expert is w1, w3 [I, H] and w2 [H, I] (n = 3*H*I weights). Per format:
  fp32 / bf16 / fp16   4 / 2 / 2 bytes per weight
  int8                 1 byte per weight + an fp16 scale per output row (2I + H rows): symmetric
  int4 / int3 / int2   bits/8 bytes per weight + an fp16 scale and an fp16 zero point per group of
                       `group_size` weights along the input dimension: asymmetric
"""

from __future__ import annotations

DEFAULT_GROUP_SIZE = 128
EXPERT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4", "int3", "int2")
_FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_INT_BITS = {"int4": 4, "int3": 3, "int2": 2}


def expert_bytes(hidden: int, inter: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one expert (weights plus scales/zeros) in format `fmt`."""
    n = 3 * hidden * inter
    if fmt in _FLOAT_BYTES:
        return n * _FLOAT_BYTES[fmt]
    if fmt == "int8":
        return n + 2 * (2 * inter + hidden)
    if fmt in _INT_BITS:
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        groups = inter * -(-hidden // group_size) * 2 + hidden * -(-inter // group_size)
        return -(-n * _INT_BITS[fmt] // 8) + 4 * groups
    raise ValueError(f"expert format {fmt!r} is not one of {list(EXPERT_FORMATS)}")
