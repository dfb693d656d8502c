"""Quantized checkpoints on disk: compressed-tensors "pack-quantized" for the routed experts.

Why this format: it is what llm-compressor writes and vLLM reads for weight-only W4A16 / W8A16 models
(MoE included), so a folder `moe-offload quantize` writes is a standard checkpoint, and published
pack-quantized Mixtral / Qwen-MoE checkpoints have the same layout. What we write and read, per
routed expert weight `<name>` (the hub name without `.weight`):

  <name>.weight_packed      int32 [N, K * bits / 32]  values along the input dim K, value k at bits
                            bits * (k % (32 / bits)) of word k // (32 / bits); stored unsigned, i.e. the
                            signed value plus 2**(bits-1)
  <name>.weight_scale       fp16 [N, K / G] (int4, strategy group) or [N, 1] (int8, strategy channel)
  <name>.weight_zero_point  int32 [ceil(N / 8), K / G] (int4-asym only), packed along N the same way
  <name>.weight_shape       int32 [2] = (N, K)

Dequantization: w = (q - zp) * scale with q, zp signed. This maps onto our row format without loss:
our int4 stores unsigned q_u, z_u in [0, 15] (w = (q_u - z_u) * s), so q = q_u - 8, zp = z_u - 8 and the
packed unsigned words hold q_u and z_u themselves; our int8 is symmetric (zp = 0) with q in [-127, 127].
Our symmetric int4 ('int4', the default) has z_u = 8 everywhere and writes no zero point tensor:
that is the folder transformers 5.25 (compressed-tensors 0.20) and vLLM load; transformers cannot load
an asymmetric int4 MoE folder ('int4-asym': "Asymmetric quant requires zero-point values").
Scales are fp16 in our format; stored as fp16 (bf16/fp32 scales of other writers are converted when
exactly representable, else refused). Symmetric int4 (no zero point tensor) reads as z_u = 8.

config.json carries `quantization_config` (quant_method compressed-tensors, format pack-quantized, one
config group for the routed experts, everything else in `ignore`). Read: num_bits 4 (strategy group,
group_size 32/64/128, symmetric or not) or 8 (strategy channel, symmetric); anything else is refused
with the field named. Activations are not quantized (input_activations must be null).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..formats import GROUP_SIZES
from ..formats.int4 import pack_int4, unpack_int4

FORMAT = "pack-quantized"
BITS = {"int4": 4, "int4-asym": 4, "int8": 8}
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


# --- config --------------------------------------------------------------------------------------
def quantization_config(fmt: str, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` of config.json for routed experts in `fmt`."""
    bits = BITS[fmt]
    grouped = bits == 4
    weights = {"num_bits": bits, "type": "int", "symmetric": fmt != "int4-asym", "dynamic": False,
               "strategy": "group" if grouped else "channel",
               "group_size": group_size if grouped else None, "observer": "minmax", "actorder": None}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None}


def parse_quantization_config(qc: Any, source: str) -> tuple[str, int, bool]:
    """config.json's quantization_config -> (expert format, group size, symmetric); ConfigError naming
    the field that this runtime cannot read. GPTQ / AWQ / FP8 / MXFP4 configs and the pack-quantized
    variants the int4 / int8 rows do not hold name a hub format (quant/hub.py: read as stored)."""
    from .hub import compressed_format_name, hub_format_name

    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: quantization_config is {qc!r}; supported: a JSON object")
    if qc.get("quant_method") != "compressed-tensors":
        return hub_format_name(qc, source), 128, True
    try:
        return _parse_own(qc, source)
    except ConfigError:
        return compressed_format_name(qc, source), 128, True


def _parse_own(qc: dict[str, Any], source: str) -> tuple[str, int, bool]:
    """The pack-quantized variants `moe-offload quantize` writes (read into the int4 / int8 rows)."""
    def bad(field: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{source}: quantization_config.{field} is {value!r}; supported: {want}")

    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise bad("config_groups", groups, "exactly one group (the routed experts)")
    (gname, group), = groups.items()
    fmt_name = group.get("format") or qc.get("format")
    if fmt_name != FORMAT:
        raise bad("format", fmt_name, f"{FORMAT!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise bad(f"config_groups.{gname}.input_activations", group.get("input_activations"),
                  "null (weight-only quantization)")
    w = group.get("weights") or {}
    bits, strategy, sym = w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric"))
    if w.get("type", "int") != "int":
        raise bad(f"config_groups.{gname}.weights.type", w.get("type"), "'int'")
    if w.get("actorder") in ("group", "dynamic"):  # columns in activation order: the hub 'ct:' format's
        raise bad(f"config_groups.{gname}.weights.actorder", w.get("actorder"), "null, 'static' or 'weight'")
    if bits == 8:
        if strategy != "channel" or not sym:
            raise bad(f"config_groups.{gname}.weights", {"strategy": strategy, "symmetric": sym},
                      "8 bits: strategy 'channel', symmetric")
        return "int8", 128, True
    if bits == 4:
        g = w.get("group_size")
        if strategy != "group" or g not in GROUP_SIZES:
            raise bad(f"config_groups.{gname}.weights", {"strategy": strategy, "group_size": g},
                      f"4 bits: strategy 'group', group_size in {list(GROUP_SIZES)}")
        return ("int4" if sym else "int4-asym"), int(g), sym
    raise bad(f"config_groups.{gname}.weights.num_bits", bits, "4 or 8")


# --- packing --------------------------------------------------------------------------------------
def pack_int32(u: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values u [N, K] (< 2**bits) -> int32 words, 32/bits values per word along `dim`
    (the first value in the lowest bits; padded with zeros)."""
    per = 32 // bits
    x = u.to(torch.int64)
    if dim == 0:
        x = x.t()
    n, k = x.shape
    pad = (-k) % per
    x = torch.nn.functional.pad(x, (0, pad)).view(n, -1, per)  # [n, words, per]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (x << shifts).sum(-1)  # [n, words], < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32: -> uint8 values with `length` entries along `dim`."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    shifts = torch.arange(per, dtype=torch.int64) * bits
    x = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)[:, :length]
    x = x.to(torch.uint8)
    return x.t().contiguous() if dim == 0 else x


# --- one matrix: our sections <-> compressed-tensors tensors --------------------------------------
def compress_matrix(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: str, k: int
                    ) -> dict[str, torch.Tensor]:
    """Our sections of one matrix (q: int8 [N, K] or int4 bytes [N, ceil(K/2)]; s fp16 [N] or [N, g];
    z fp16 [N, g] or None) -> {suffix: tensor} in pack-quantized form."""
    if fmt == "int8":
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        out = {"weight_packed": pack_int32(u, 8, 1), "weight_scale": s.reshape(-1, 1).clone()}
    else:
        out = {"weight_packed": pack_int32(unpack_int4(q, k), 4, 1), "weight_scale": s.clone()}
        if fmt == "int4-asym":
            out["weight_zero_point"] = pack_int32(z.to(torch.uint8), 4, 0)
        elif z is not None and not bool((z == 8).all()):
            raise ValueError("symmetric int4 sections with a zero point other than 8")
    out["weight_shape"] = torch.tensor([q.shape[0], k], dtype=torch.int32)
    return out


def decompress_matrix(t: dict[str, torch.Tensor], fmt: str, group_size: int, symmetric: bool, n: int, k: int,
                      where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """pack-quantized tensors of one matrix [n, k] -> our sections (q, s, z); CheckpointError naming the
    tensor whose shape or dtype is wrong."""
    for suffix in ("weight_packed", "weight_scale", "weight_shape") + (() if symmetric or fmt == "int8"
                                                                        else ("weight_zero_point",)):
        if suffix not in t:
            raise CheckpointError(f"{where}.{suffix}: missing (needed by the {fmt} pack-quantized format)")
    shape = t["weight_shape"].reshape(-1).tolist()
    if shape != [n, k]:
        raise CheckpointError(f"{where}.weight_shape is {shape}, expected {[n, k]}")
    bits = BITS[fmt]
    words = -(-k * bits // 32)
    _expect(t["weight_packed"], (n, words), torch.int32, f"{where}.weight_packed")
    if fmt == "int8":
        _expect(t["weight_scale"], (n, 1), None, f"{where}.weight_scale")
        q = (unpack_int32(t["weight_packed"], 8, k, 1).to(torch.int16) - 128).to(torch.int8)
        return q, _fp16(t["weight_scale"].reshape(n), f"{where}.weight_scale"), None
    g = -(-k // group_size)
    _expect(t["weight_scale"], (n, g), None, f"{where}.weight_scale")
    q = pack_int4(unpack_int32(t["weight_packed"], 4, k, 1))
    if symmetric:
        z = torch.full((n, g), 8.0, dtype=torch.float16)
    else:
        _expect(t["weight_zero_point"], (-(-n // 8), g), torch.int32, f"{where}.weight_zero_point")
        z = unpack_int32(t["weight_zero_point"], 4, n, 0).to(torch.float16)
    return q, _fp16(t["weight_scale"], f"{where}.weight_scale"), z


def _expect(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None, what: str) -> None:
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        raise CheckpointError(f"{what} has shape {list(t.shape)} {str(t.dtype).removeprefix('torch.')}, expected "
                              f"{list(shape)}{' ' + str(dtype).removeprefix('torch.') if dtype else ''}")


def _fp16(s: torch.Tensor, what: str) -> torch.Tensor:
    h = s.to(torch.float16)
    if not torch.equal(h.to(s.dtype), s):
        raise CheckpointError(f"{what}: scales are not exactly representable in float16 (this runtime keeps "
                              "fp16 scales); requantize with `moe-offload quantize`")
    return h


def hub_format(fmt: str) -> Any:
    """The HubFormat called `fmt`, or None for the int4 / int8 rows (formats.hub_format_of)."""
    from ..formats import hub_format_of

    return hub_format_of(fmt)


def expected_shapes(n: int, k: int, fmt: str, group_size: int, symmetric: bool) -> dict[str, tuple[int, ...]]:
    """{suffix: shape} of one matrix [n, k] on disk."""
    hub = hub_format(fmt)
    if hub is not None:
        return {sfx: shape for sfx, _, shape in hub.matrix_specs(n, k)} | {
            sfx: shape for sfx, _, shape, _ in hub.meta_specs(n, k)}
    bits = BITS[fmt]
    out = {"weight_packed": (n, -(-k * bits // 32)), "weight_shape": (2,)}
    if fmt == "int8":
        out["weight_scale"] = (n, 1)
    else:
        g = -(-k // group_size)
        out["weight_scale"] = (n, g)
        if not symmetric:
            out["weight_zero_point"] = (-(-n // 8), g)
    return out


def check_format(fmt: str) -> None:
    if fmt not in BITS:
        raise ConfigError(f"expert format {fmt!r} cannot be written; one of {list(BITS)}")


def read_packed_expert(get: Any, names: dict[str, str], fmt: str, group_size: int, symmetric: bool, hidden: int,
                       inter: int) -> dict[str, torch.Tensor]:
    """One routed expert of a pack-quantized checkpoint -> our sections (qw13, s13, [z13,] qw2, s2, [z2]);
    of a hub format (GPTQ, AWQ, FP8, ...): the file's tensors themselves, by section name (read_hub_expert).
    get(name) reads a tensor; names: w1/w3/w2 -> hub weight name (ending in .weight)."""
    hub = hub_format(fmt)
    if hub is not None:
        return read_hub_expert(get, names, hub, hidden, inter)
    mats = {}
    for w, (n, k) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
        base = names[w].removesuffix(".weight")
        wanted = [s for s in SUFFIXES if not (s == "weight_zero_point" and (symmetric or fmt == "int8"))]
        mats[w] = decompress_matrix({s: get(f"{base}.{s}") for s in wanted}, fmt, group_size, symmetric, n, k, base)
    (q1, s1, z1), (q3, s3, z3), (q2, s2, z2) = mats["w1"], mats["w3"], mats["w2"]
    out = {"qw13": torch.cat([q1, q3]), "s13": torch.cat([s1, s3]), "qw2": q2, "s2": s2}
    if fmt != "int8":
        out.update(z13=torch.cat([z1, z3]), z2=z2)
    return out


def packed_expert_tensors(sections: dict[str, torch.Tensor], names: dict[str, str], fmt: str, hidden: int,
                          inter: int) -> dict[str, torch.Tensor]:
    """Our sections of one expert -> its pack-quantized tensors by full name (w1/w3/w2 as the hub names)."""
    q13, s13, z13 = sections["qw13"], sections["s13"], sections.get("z13")
    parts = {"w1": (q13[:inter], s13[:inter], None if z13 is None else z13[:inter], hidden),
             "w3": (q13[inter:], s13[inter:], None if z13 is None else z13[inter:], hidden),
             "w2": (sections["qw2"], sections["s2"], sections.get("z2"), inter)}
    out = {}
    for w, (q, s, z, k) in parts.items():
        base = names[w].removesuffix(".weight")
        out.update({f"{base}.{suffix}": t for suffix, t in compress_matrix(q, s, z, fmt, k).items()})
    return out


def read_hub_expert(get: Any, names: dict[str, str], fmt: Any, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    """One routed expert of a hub-format checkpoint -> {section: the file's tensor} (no conversion);
    CheckpointError naming the file and tensor whose shape, dtype or values are wrong."""
    owner = getattr(get, "__self__", None)  # Checkpoint.tensor: name the file in errors

    def where(name: str) -> str:
        info = getattr(owner, "tensors", {}).get(name)
        return f"{info.file}: tensor {name}" if info is not None else f"tensor {name}"

    out = {}
    dims = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
    for w, n, k in fmt.matrices(hidden, inter):
        if w not in names:
            raise CheckpointError(f"expert format {fmt.name}: matrix {w} has no checkpoint name (fused layouts are "
                                  "read by their family)")
        base = names[w].removesuffix(".weight")
        mats = {}
        for sfx, dt, shape in fmt.matrix_specs(*dims[w]):
            t = get(f"{base}.{sfx}")
            if t.dtype != dt or tuple(t.shape) != shape:
                raise CheckpointError(f"{where(f'{base}.{sfx}')} is {list(t.shape)} {str(t.dtype).removeprefix('torch.')}, "
                                      f"expected {list(shape)} {str(dt).removeprefix('torch.')} ({fmt.name})")
            mats[sfx] = t
            out[f"{w}.{sfx}"] = t
        for sfx, _, _, value in fmt.meta_specs(n, k):
            got = get(f"{base}.{sfx}").reshape(-1).tolist()
            if got != value:
                raise CheckpointError(f"{where(f'{base}.{sfx}')} is {got}, expected {value}")
        problem = fmt.check_matrix(mats, n, k)
        if problem:
            raise CheckpointError(f"{where(base + '.' + problem.split()[0])}: {problem} ({fmt.name})")
    return out
