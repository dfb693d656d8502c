"""Compatibility names for the string API of expert formats; the formats are strategy objects in
moe_offload.formats (one class per format). Callers: analysis/sim.py and benchmarks/ (to switch to
moe_offload.formats.expert_bytes / get_format; then delete this module)."""

from __future__ import annotations

from ..formats import DEFAULT_GROUP_SIZE, GROUP_SIZES, Section, expert_bytes, format_names, get_format

EXPERT_FORMATS = format_names()
QUANT_FORMATS = ("int8", "int4")  # stored in the host tier and run by the kernels


def expert_layout(hidden: int, inter: int, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> list[Section]:
    """The sections of one packed expert row; [] for float formats."""
    f = get_format(fmt, group_size)
    return f.layout(hidden, inter) if f.quantized else []


__all__ = ["DEFAULT_GROUP_SIZE", "EXPERT_FORMATS", "GROUP_SIZES", "QUANT_FORMATS", "expert_bytes", "expert_layout"]
