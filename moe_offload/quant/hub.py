"""quantization_config of published quantized checkpoints -> the hub expert format that reads them as
stored (moe_offload/formats/hub.py and its subclasses). ConfigError naming the field this runtime
cannot read (one line)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..formats.awq import AwqFormat
from ..formats.compressed import CompressedFormat
from ..formats.fp8 import Fp8BlockFormat
from ..formats.gptq import GptqFormat
from ..formats.mxfp4 import Mxfp4Format

METHODS = ("gptq", "awq", "fp8", "mxfp4", "compressed-tensors")


def _bad(source: str, field: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{source}: quantization_config.{field} is {value!r}; supported: {want}")


def hub_format_name(qc: dict[str, Any], source: str) -> str:
    """The format name for a gptq / awq / fp8 / mxfp4 quantization_config."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise _bad(source, "checkpoint_format", fmt, "'gptq' or 'gptq_v2'")
        bits, group = qc.get("bits"), qc.get("group_size", 128)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0:
            raise _bad(source, "bits", bits, "4 or 8")
        if group is None or not isinstance(group, int) or (group <= 0 and group != -1):
            raise _bad(source, "group_size", group, "a positive integer or -1")
        # bits other than 4 / 8 are refused when the checkpoint is opened, naming a tensor (checkpoint.py)
        tokens = [str(bits), "gch" if group == -1 else f"g{group}", "sym" if qc.get("sym", True) else "asym"]
        tokens += (["act"] if qc.get("desc_act") else []) + (["v2"] if fmt == "gptq_v2" else [])
        return GptqFormat.PREFIX + ",".join(tokens)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _bad(source, "version", qc.get("version"), "'gemm' (the layout AutoAWQ writes by default)")
        if qc.get("zero_point", True) is not True:
            raise _bad(source, "zero_point", qc.get("zero_point"), "true")
        bits = qc.get("bits", qc.get("w_bit"))
        group = qc.get("group_size", qc.get("q_group_size"))
        if bits != 4:
            raise _bad(source, "bits", bits, "4")
        if not isinstance(group, int) or group <= 0:
            raise _bad(source, "group_size", group, "a positive integer")
        return AwqFormat(4, group).name
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise _bad(source, "fmt", qc.get("fmt"), "'e4m3'")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise _bad(source, "activation_scheme", qc.get("activation_scheme"), "'dynamic' (no stored input scales)")
        block = qc.get("weight_block_size")
        if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise _bad(source, "weight_block_size", block, "two positive integers, e.g. [128, 128]")
        return Fp8BlockFormat(tuple(block)).name
    if method == "mxfp4":
        return Mxfp4Format().name
    raise _bad(source, "quant_method", qc.get("quant_method"), repr(list(METHODS)))


def compressed_format_name(qc: dict[str, Any], source: str) -> str:
    """The 'ct:' format name for a compressed-tensors pack-quantized quantization_config."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _bad(source, "config_groups", groups, "exactly one group")
    (gname, group), = groups.items()
    where = f"config_groups.{gname}"
    fmt_name = group.get("format") or qc.get("format")
    if fmt_name != "pack-quantized":
        raise _bad(source, "format", fmt_name, "'pack-quantized'")
    if group.get("input_activations") or group.get("output_activations"):
        raise _bad(source, f"{where}.input_activations", group.get("input_activations"), "null (weight-only)")
    w = group.get("weights") or {}
    if w.get("type", "int") != "int":
        raise _bad(source, f"{where}.weights.type", w.get("type"), "'int'")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if bits not in (2, 4, 8):
        raise _bad(source, f"{where}.weights.num_bits", bits, "2, 4 or 8")
    actorder = w.get("actorder")
    if actorder not in (None, "static", "weight", "group", "dynamic"):
        raise _bad(source, f"{where}.weights.actorder", actorder, "null, 'static', 'weight' or 'group'")
    if w.get("dynamic"):
        raise _bad(source, f"{where}.weights.dynamic", w.get("dynamic"), "false")
    # 'group' (older 'dynamic'): columns quantized in activation order, each column's group in weight_g_idx;
    # 'static' / 'weight' reorder while quantizing but store the usual layout
    in_order = actorder in ("group", "dynamic")
    if strategy == "group":
        g = w.get("group_size")
        if not isinstance(g, int) or g <= 0:
            raise _bad(source, f"{where}.weights.group_size", g, "a positive integer")
        return CompressedFormat(bits, g, bool(w.get("symmetric", True)), act_order=in_order).name
    if in_order:
        raise _bad(source, f"{where}.weights.actorder", actorder, "null, 'static' or 'weight' with strategy "
                   f"{strategy!r} (activation-order groups need strategy 'group')")
    if strategy == "channel":
        return CompressedFormat(bits, None, bool(w.get("symmetric", True))).name
    raise _bad(source, f"{where}.weights.strategy", strategy, "'group' or 'channel'")
