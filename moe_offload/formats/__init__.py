"""Expert formats as strategy objects: one class per format, chosen once at load (see base.py).

  fp32 / bf16 / fp16   FloatFormat (float.py): experts in the compute dtype
  int8                 Int8Format (int8.py): symmetric, one scale per output row
  int4                 Int4Format (int4.py): symmetric, one scale per group along K (what transformers loads)
  int4-asym            Int4Format (int4.py, symmetric=False): scale and zero point per group along K
  int3 / int2          ProjectedIntFormat (projected.py): sizes for projections only
  gguf:Q4_0, ...       GgufFormat (gguf.py): GGUF block types as the file stores them (read from .gguf
                       files only; 'gguf:' + one type, or gate,up,down types); loop backend, and triton
                       for Q8_0 / Q4_0 / Q4_K / Q6_K / MXFP4 with gate and up of one type
  gguf:A*2;B*30        GgufLayersFormat (gguf.py): layers of different GGUF types, one GgufFormat each
  gptq:4,g128,sym,...  GptqFormat (gptq.py)         \
  awq:4,g128           AwqFormat (awq.py)            | hub formats (hub.py): a published checkpoint's
  fp8:128x128          Fp8BlockFormat (fp8.py)       | expert tensors kept as stored, dequantized per
  mxfp4                Mxfp4Format (mxfp4.py)        | expert on the loop backend
  ct:4,g64,asym        CompressedFormat (compressed.py) /

get_format(name, group_size=, compute_dtype=) builds one; choose_format() resolves load()'s
expert_dtype option. A new format: one module with an ExpertFormat subclass, registered here with
register_format, plus its tests.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import MoeOffloadError
from .base import ALIGN, DEFAULT_GROUP_SIZE, GROUP_SIZES, ExpertFormat, PackedFormat, Section
from .float import FLOAT_DTYPES, FloatFormat
from .awq import AwqFormat
from .compressed import CompressedFormat
from .fp8 import Fp8BlockFormat
from .gguf import PREFIX as GGUF_PREFIX, GgufFormat, GgufLayersFormat, parse_gguf_layers, parse_gguf_name
from .gptq import GptqFormat
from .hub import HubFormat
from .int4 import Int4Format
from .int8 import Int8Format
from .mxfp4 import Mxfp4Format
from .projected import ProjectedIntFormat

# hub formats by name prefix (each class's from_name parses the rest)
HUB_FORMATS: dict[str, type[HubFormat]] = {c.PREFIX: c for c in (GptqFormat, AwqFormat, Fp8BlockFormat, Mxfp4Format,
                                                                  CompressedFormat)}


def hub_class(name: str) -> type[HubFormat] | None:
    """The hub format class whose names `name` has, or None."""
    for prefix, cls in HUB_FORMATS.items():
        if name.startswith(prefix):
            return cls
    return None


def hub_format_of(name: str | None, compute_dtype: torch.dtype | None = None) -> HubFormat | None:
    """The hub format called `name` (ValueError for a bad one), or None when `name` is not a hub name."""
    cls = hub_class(name) if isinstance(name, str) else None
    return None if cls is None else cls.from_name(name, compute_dtype)


def loop_only(name: str) -> bool:
    """Whether experts stored as `name` run on moe_backend 'loop' only (GGUF and hub formats)."""
    return name.startswith(GGUF_PREFIX) or hub_class(name) is not None

_FACTORIES: dict[str, Callable[[torch.dtype | None, int], ExpertFormat]] = {}


def register_format(name: str, factory: Callable[[torch.dtype | None, int], ExpertFormat]) -> None:
    """Make `name` a format: factory(compute_dtype, group_size) -> ExpertFormat."""
    _FACTORIES[name] = factory


for _name, _dt in FLOAT_DTYPES.items():
    register_format(_name, lambda compute_dtype, group_size, _dt=_dt: _float(_dt, compute_dtype, group_size))
register_format("int8", lambda compute_dtype, group_size: Int8Format(compute_dtype, group_size))
register_format("int4", lambda compute_dtype, group_size: Int4Format(compute_dtype, group_size))
register_format("int4-asym", lambda compute_dtype, group_size: Int4Format(compute_dtype, group_size, symmetric=False))
for _bits in (3, 2):
    register_format(f"int{_bits}", lambda compute_dtype, group_size, _b=_bits: ProjectedIntFormat(_b, compute_dtype,
                                                                                                 group_size))


def _float(dtype: torch.dtype, compute_dtype: torch.dtype | None, group_size: int) -> FloatFormat:
    if compute_dtype is not None and compute_dtype != dtype:
        raise ValueError(f"float expert format {str(dtype).removeprefix('torch.')} runs in its own dtype, not "
                         f"{str(compute_dtype).removeprefix('torch.')}")
    return FloatFormat(dtype, group_size)


def format_names() -> tuple[str, ...]:
    """Every registered format name (runnable or for projections)."""
    return tuple(_FACTORIES)


def get_format(name: str, group_size: int = DEFAULT_GROUP_SIZE, compute_dtype: torch.dtype | None = None
               ) -> ExpertFormat:
    """The format called `name` ('fp32', 'bf16', 'fp16', 'int8', 'int4', 'int3', 'int2'); ValueError
    naming a bad name or group size."""
    if name.startswith(GGUF_PREFIX):
        if ";" in name or "*" in name:  # layers of different types
            return GgufLayersFormat(parse_gguf_layers(name), compute_dtype, group_size)
        return GgufFormat(parse_gguf_name(name), compute_dtype, group_size)
    hub = hub_format_of(name, compute_dtype)
    if hub is not None:
        return hub
    if name not in _FACTORIES:
        raise ValueError(f"expert format {name!r} is not one of {list(_FACTORIES)}")
    return _FACTORIES[name](compute_dtype, group_size)


def float_format(dtype: torch.dtype) -> FloatFormat:
    """Experts kept in the compute dtype `dtype`."""
    return FloatFormat(dtype)


def expert_bytes(hidden: int, inter: int, name: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one expert in the format called `name` (the one formula: ExpertFormat.expert_bytes)."""
    return get_format(name, group_size).expert_bytes(hidden, inter)


EXPERT_DTYPES = ("auto", "bf16", "fp16", "int8", "int4", "int4-asym")  # load()'s expert_dtype choices


def choose_format(expert_dtype: str, group_size: int, compute_dtype: torch.dtype, moe_backend: str) -> ExpertFormat:
    """load()'s expert_dtype / group_size options -> the format the store and kernels use (MoeOffloadError
    naming the option that does not fit): 'auto' and the float names keep experts in the compute dtype."""
    if expert_dtype.startswith(GGUF_PREFIX):  # a GGUF file's experts, as stored
        try:
            fmt = get_format(expert_dtype, group_size, compute_dtype)
        except ValueError as exc:
            raise MoeOffloadError(str(exc)) from None
        if moe_backend not in fmt.moe_backends:
            why = fmt.triton_problem() if moe_backend == "triton" else None
            runs = " or ".join(repr(b) for b in fmt.moe_backends) + ("" if len(fmt.moe_backends) > 1 else " only")
            raise MoeOffloadError(f"{why or f'GGUF experts ({expert_dtype}) run on moe_backend {runs}'}; got "
                                  f"moe_backend {moe_backend!r}: pass moe_backend='loop' (--tuning moe_backend=loop)")
        return fmt
    if hub_class(expert_dtype) is not None:  # a published checkpoint's experts (GPTQ, AWQ, FP8, ...), as stored
        try:
            fmt = get_format(expert_dtype, group_size, compute_dtype)
        except ValueError as exc:
            raise MoeOffloadError(str(exc)) from None
        if moe_backend not in fmt.moe_backends:
            raise MoeOffloadError(f"{expert_dtype} experts run on moe_backend 'loop' only for now (the Triton kernel has "
                                  f"no {fmt.PREFIX.rstrip(':')} format yet); got moe_backend {moe_backend!r}: pass "
                                  "moe_backend='loop' (--tuning moe_backend=loop)")
        return fmt
    if expert_dtype not in EXPERT_DTYPES:
        raise MoeOffloadError(f"expert_dtype {expert_dtype!r} is not one of {list(EXPERT_DTYPES)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise MoeOffloadError(f"group_size {group_size!r} is not one of {list(GROUP_SIZES)} (int4 groups along "
                              "the input dimension)")
    if expert_dtype == "auto":
        return float_format(compute_dtype)
    try:
        fmt = get_format(expert_dtype, group_size, compute_dtype)
    except ValueError:
        raise MoeOffloadError(f"expert_dtype {expert_dtype!r} needs the compute dtype "
                              f"{str(FLOAT_DTYPES[expert_dtype]).removeprefix('torch.')} (dtype=...), got "
                              f"{str(compute_dtype).removeprefix('torch.')}; int8 / int4 run at any dtype") from None
    if moe_backend not in fmt.moe_backends:
        raise MoeOffloadError(f"expert_dtype {expert_dtype!r} runs on moe_backend "
                              f"{' or '.join(repr(b) for b in fmt.moe_backends)} (dequantized in-kernel); got "
                              f"moe_backend {moe_backend!r}")
    return fmt


__all__ = ["ALIGN", "AwqFormat", "CompressedFormat", "DEFAULT_GROUP_SIZE", "EXPERT_DTYPES", "ExpertFormat", "FloatFormat",
           "Fp8BlockFormat", "GROUP_SIZES", "GgufFormat", "GgufLayersFormat", "GptqFormat", "HUB_FORMATS", "HubFormat",
           "Int4Format", "Int8Format", "Mxfp4Format", "PackedFormat", "ProjectedIntFormat", "Section", "choose_format",
           "expert_bytes", "float_format", "format_names", "get_format", "hub_class", "hub_format_of", "loop_only",
           "register_format"]
