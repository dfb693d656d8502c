"""Safetensors checkpoints (single file or sharded index): validation, then lazy mmap reads.

Besides reading a tensor (a copy, converted as asked), a checkpoint hands out its tensors in place:
`mapped_tensor(name)` is a view of the file's read-only memory map, as stored (nothing read or copied),
and `in_place()` a reader with the tensor() / tensor_row() calls the families' read functions make that
answers with such views. The host expert store reads experts whose bytes are its rows that way
(offload/store.py), so a model larger than free RAM loads, the OS page cache its host tier.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import families
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, NonFiniteError
from .formats.hub import SAFETENSORS_DTYPE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PACKED_INT_SUFFIXES = (".weight_packed", ".weight_zero_point", ".weight_shape")  # compressed-tensors
_MAX_HEADER = 100 * 1024 * 1024
_TORCH_DTYPE = {v: k for k, v in SAFETENSORS_DTYPE.items()}
_MAP_DTYPE = {**_TORCH_DTYPE, "I64": torch.int64, "F64": torch.float64, "I16": torch.int16}  # viewable in place


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int = -1  # where its bytes start in the file (header included); -1: unknown


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the family's hub layout (cfg.family names them), with its shape."""
    family, i, h = cfg.family, cfg.intermediate_size, cfg.hidden_size
    shapes = dict(family.model_tensors(cfg).values())
    for layer in range(cfg.num_hidden_layers):
        shapes.update(family.layer_tensors(cfg, layer).values())
        if (cfg.expert_format is None or fused_packed(cfg)) and layer >= cfg.first_k_dense_replace:
            shapes.update(family.expert_tensors(cfg, layer))  # as the family stores them (fused: packed too)
            continue
        for e in range(cfg.num_local_experts if layer >= cfg.first_k_dense_replace else 0):
            for w, shape in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))):
                name = family.expert_name(layer, e, w)
                if cfg.expert_format is None:
                    shapes[name] = shape
                    continue
                from .quant.ckpt import expected_shapes  # packed experts (compressed-tensors)

                base = name.removesuffix(".weight")
                shapes.update({f"{base}.{suffix}": shp for suffix, shp in
                               expected_shapes(*shape, cfg.expert_format, cfg.expert_group_size,
                                               cfg.expert_symmetric).items()})
    return shapes


def fused_packed(cfg: ModelConfig) -> bool:
    """Whether the checkpoint stores each layer's experts packed in fused tensors (GPT-OSS's MXFP4: the
    family names them, Family.packed_expert_tensors) rather than one set of tensors per expert."""
    return cfg.expert_format is not None and hasattr(cfg.family, "packed_expert_tensors")


def expert_dtypes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The safetensors dtypes allowed for each packed expert tensor (a quantized checkpoint's); tensors not
    listed are float weights (FLOAT_DTYPES)."""
    if cfg.expert_format is None:
        return {}
    if fused_packed(cfg):
        return {name: (SAFETENSORS_DTYPE[dt],) for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
                for name, _, dt in cfg.family.packed_expert_tensors(cfg, layer).values() if dt is not None}
    from .quant.ckpt import hub_format

    hub = hub_format(cfg.expert_format)
    family, i, h = cfg.family, cfg.intermediate_size, cfg.hidden_size
    out: dict[str, tuple[str, ...]] = {}
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            for w, (n, k) in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))):
                base = family.expert_name(layer, e, w).removesuffix(".weight")
                if hub is None:
                    out.update({f"{base}{sfx}": ("I32",) for sfx in PACKED_INT_SUFFIXES})
                    continue
                out.update({f"{base}.{sfx}": (SAFETENSORS_DTYPE[dt],) for sfx, dt, _ in hub.matrix_specs(n, k)})
                out.update({f"{base}.{sfx}": dts for sfx, dts, _, _ in hub.meta_specs(n, k)})
    return out


def identity_names(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The tensors of `layer` a model's fingerprint hashes: its router and its post-attention norm (a
    dense first layer: its norm only)."""
    names = cfg.family.layer_tensors(cfg, layer)
    return tuple(names[slot][0] for slot in ("gate", "post_attention_layernorm") if slot in names)


# A float is NaN/Inf exactly when its exponent bits are all ones: test that on the integer view (fast on
# every CPU; torch.isfinite on bfloat16 is slow where the CPU has no bf16 instructions).
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf in a weight as it is read (one pass over its bytes, at load only)."""
    if not t.is_floating_point():
        return
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        bad = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
        if bad:
            raise NonFiniteError(f"{what} holds {bad} non-finite value(s) (NaN) of {t.numel()}: the checkpoint is "
                                 "corrupt; re-download or re-convert it")
        return
    if t.dtype in _EXPONENT and t.is_contiguous():
        itype, mask = _EXPONENT[t.dtype]
        bits = t.view(itype)
        if not bool(((bits & mask) == mask).any()):
            return
    elif bool(torch.isfinite(t).all()):
        return
    bad = int((~torch.isfinite(t)).sum())
    raise NonFiniteError(f"{what} holds {bad} non-finite value(s) (NaN/Inf) of {t.numel()}: "
                         "the checkpoint is corrupt; re-download or re-convert it")


def expert_name(layer: int, expert: int, w: str, model_type: str) -> str:
    """Routed expert `expert` of `layer`, weight w in w1 (gate) / w3 (up) / w2 (down), as the family's
    checkpoint names it (families.Family.expert_name)."""
    return families.get(model_type).expert_name(layer, expert, w)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check that every tensor's bytes are in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {n} bytes, file has {size})")
            raw = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, meta in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if dtype in _ITEMSIZE and end - begin != want:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} has {end - begin} bytes, "
                                  f"its shape {list(shape)} x {dtype} needs {want}")
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                                  f"section but the file holds only {data_bytes} data bytes")
        infos[name] = TensorInfo(name, path, dtype, shape, 8 + n + begin)
    return infos


class Checkpoint:
    """A Hugging Face MoE model folder of a registered family (moe_offload.families): config.json plus
    model.safetensors or a sharded index.

    Construction reads headers only. `validate()` reports every problem at once; `tensor()` reads one
    tensor through a memory map, so loading never holds two full copies of the weights.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: model folder does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: expected a model folder (config.json + *.safetensors)")
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.tensors = self._read_tensors()
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, torch.Tensor] = {}  # each file's read-only memory map, uint8 (mapped_tensor)
        self._dense_quant: dict[str, tuple[str, int, int]] = {}  # dense linears stored quantized (validate)
        if self.config.expert_format is not None:
            self._settle_format()

    # --- quantized checkpoints ------------------------------------------------------------------------
    def _first_expert(self, w: str = "w1") -> str:
        cfg = self.config
        return cfg.family.expert_name(cfg.first_k_dense_replace, 0, w).removesuffix(".weight")

    def _settle_format(self) -> None:
        """Fit the expert format named by quantization_config to what the files hold: a hub format's scale
        dtype from the header; pack-quantized experts the int4 / int8 rows cannot hold as stored (scales not
        fp16, an int64 weight_shape) read as the 'ct:' format; a format this runtime cannot read refused in
        one line naming the file and a tensor."""
        from dataclasses import replace

        from .formats import CompressedFormat, hub_format_of

        cfg = self.config
        base = self._first_expert()
        name = cfg.expert_format
        if name in ("int4", "int4-asym", "int8"):
            scale, shape = self.tensors.get(f"{base}.weight_scale"), self.tensors.get(f"{base}.weight_shape")
            if scale is None or (scale.dtype, getattr(shape, "dtype", "I32")) == ("F16", "I32"):
                return
            ct = (CompressedFormat(4, cfg.expert_group_size, name == "int4") if name != "int8" else
                  CompressedFormat(8, None, True))
            name = ct.name
        try:
            fmt = hub_format_of(name)
        except ValueError as exc:
            probe = next((f"{base}.{sfx}" for sfx in ("qweight", "weight_packed", "weight") if f"{base}.{sfx}" in
                          self.tensors), base)
            where = self.tensors[probe].file if probe in self.tensors else self.path / "config.json"
            raise CheckpointError(f"{where}: tensor {probe}: {exc} (quantization_config in config.json)") from None
        scale_sfx = [sfx for sfx, dt, _ in fmt.matrix_specs(cfg.intermediate_size, cfg.hidden_size)
                     if dt in (torch.float16, torch.bfloat16, torch.float32)]
        info = self.tensors.get(f"{base}.{scale_sfx[0]}") if scale_sfx else None
        if info is not None and info.dtype in _TORCH_DTYPE:
            try:
                fmt = fmt.with_scale_dtype(_TORCH_DTYPE[info.dtype])
            except ValueError as exc:
                raise CheckpointError(f"{info.file}: tensor {info.name}: {exc}") from None
        self.config = replace(cfg, expert_format=fmt.name, expert_group_size=fmt.group_size)  # the name holds the group
        if fused_packed(self.config):
            self._check_fused_experts()

    def _check_fused_experts(self) -> None:
        """A layer's fused packed expert tensors (GPT-OSS MXFP4) of the wrong shape or dtype, and biases of two
        dtypes, refused in one line naming the file and the tensor (a missing one: validate() lists it)."""
        cfg = self.config
        bias_dtypes = set()
        for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            for sec, (name, shape, dt) in cfg.family.packed_expert_tensors(cfg, layer).items():
                info = self.tensors.get(name)
                if info is None:
                    continue
                want = SAFETENSORS_DTYPE[dt] if dt is not None else None
                if info.shape != shape or (want is not None and info.dtype != want):
                    raise CheckpointError(f"{info.file}: tensor {name} is {list(info.shape)} {info.dtype}, expected "
                                          f"{list(shape)} {want or 'float'} ({cfg.expert_format} experts: "
                                          f"{cfg.num_local_experts} x {sec} of hidden_size {cfg.hidden_size}, "
                                          f"intermediate_size {cfg.intermediate_size})")
                if dt is None:
                    bias_dtypes.add(info.dtype)
                    if len(bias_dtypes) > 1 or info.dtype not in FLOAT_DTYPES:
                        raise CheckpointError(f"{info.file}: tensor {name} is {info.dtype}; the experts' biases must "
                                              f"share one float dtype (found {sorted(bias_dtypes)})")

    def expert_format(self):
        """The experts' ExpertFormat as stored (None: float experts)."""
        from .formats import get_format

        cfg = self.config
        if cfg.expert_format is None:
            return None
        fmt = get_format(cfg.expert_format, cfg.expert_group_size)
        if cfg.expert_bias and fused_packed(cfg):  # the biases travel in the row, in the file's dtype
            info = self.tensors.get(cfg.family.packed_expert_tensors(cfg, cfg.first_k_dense_replace)["b13"][0])
            fmt = fmt.with_bias(_TORCH_DTYPE.get(info.dtype, torch.bfloat16) if info else torch.bfloat16)
        return fmt

    def _dense_format(self):
        """The format that dequantizes dense linears stored quantized (hub formats; 'ct:' for int4 / int8)."""
        from .formats import CompressedFormat, hub_format_of

        cfg = self.config
        fmt = hub_format_of(cfg.expert_format)
        if fmt is None and cfg.expert_format in ("int4", "int4-asym"):
            fmt = CompressedFormat(4, cfg.expert_group_size, cfg.expert_format == "int4")
        elif fmt is None and cfg.expert_format == "int8":
            fmt = CompressedFormat(8, None, True)
        return fmt

    def _quantized_dense(self, name: str, shape: tuple[int, ...], fmt) -> list[str] | None:
        """The file's tensors of dense linear `name` when it is stored quantized (else None)."""
        if fmt is None or len(shape) != 2 or not name.endswith(".weight"):
            return None
        base = name.removesuffix(".weight")
        specs = fmt.matrix_specs(*shape) if not fmt.fused_gate_up else []
        names = [f"{base}.{sfx}" for sfx, _, _ in specs] + [f"{base}.{sfx}" for sfx, *_ in fmt.meta_specs(*shape)]
        marks = [n for n in names if n != name]
        return names if marks and any(n in self.tensors for n in marks) else None

    def expert_file_bytes(self) -> int:
        """Bytes of every routed expert's tensors the host store holds, as the files store them."""
        fmt = self.expert_format()
        cfg = self.config
        if fmt is None or not hasattr(fmt, "matrix_specs"):
            return 0
        if fused_packed(cfg):  # every tensor of the layers' fused experts: packed weights and biases
            return sum(math.prod(self.tensors[name].shape) * _ITEMSIZE[self.tensors[name].dtype]
                       for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
                       for name, _, _ in cfg.family.packed_expert_tensors(cfg, layer).values())
        total = 0
        for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            for e in range(cfg.num_local_experts):
                for w, (n, k) in (("w1", (cfg.intermediate_size, cfg.hidden_size)),
                                  ("w3", (cfg.intermediate_size, cfg.hidden_size)),
                                  ("w2", (cfg.hidden_size, cfg.intermediate_size))):
                    base = cfg.family.expert_name(layer, e, w).removesuffix(".weight")
                    for sfx, dt, shape in fmt.matrix_specs(n, k):
                        info = self.tensors[f"{base}.{sfx}"]
                        total += math.prod(info.shape) * _ITEMSIZE[info.dtype]
        return total

    def tensor_groups(self) -> dict[str, dict[str, int]]:
        """Format -> tensor count per group of linears (experts w1/w3/w2, attention, router, ...): a linear
        stored quantized counts as the format's name, a float one as its dtype (F16, BF16, ...)."""
        fmt = self._dense_format()
        sfxs = sorted({sfx for sfx, *_ in fmt.matrix_specs(64, 64) + fmt.meta_specs(64, 64)} if fmt else set(),
                      key=len, reverse=True)
        marks = [sfx for sfx in sfxs if sfx != "weight"]  # FP8 keeps `weight`: its scale marks it quantized
        seps = (".", "_") if fmt is not None and fmt.fused_gate_up else (".",)  # GPT-OSS: gate_up_proj_blocks
        quantized = {n[: -len(m) - 1] for n in self.tensors for m in marks for sep in seps if n.endswith(sep + m)}
        groups: dict[str, dict[str, int]] = {}
        seen: set[str] = set()
        for name, info in sorted(self.tensors.items()):
            base = next((name[: -len(s) - 1] for s in sfxs for sep in seps if name.endswith(sep + s)
                         and name[: -len(s) - 1] in quantized), None)
            if base is not None:
                if base in seen:
                    continue
                seen.add(base)
                kind = self.config.expert_format if ".experts." in base else fmt.name
            else:
                base, kind = name.removesuffix(".weight").removesuffix(".bias"), info.dtype
            g = _group_name(base)
            groups.setdefault(g, {})
            groups[g][kind] = groups[g].get(kind, 0) + 1
        return groups

    def _read_tensors(self) -> dict[str, TensorInfo]:
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            return self._read_index(index)
        if single.is_file():
            return read_header(single)
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} in the model folder")

    def _read_index(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a valid index (needs a JSON object 'weight_map')") from None
        tensors: dict[str, TensorInfo] = {}
        problems = []
        for shard in sorted(set(weight_map.values())):
            shard_path = self.path / shard
            if not shard_path.is_file():
                problems.append(f"shard {shard} listed in {INDEX_FILE} does not exist")
                continue
            for name, info in read_header(shard_path).items():
                if weight_map.get(name) != shard:
                    problems.append(f"{shard}: tensor {name} is not mapped to this shard in the index")
                tensors[name] = info
        for name, shard in weight_map.items():
            if name not in tensors and (self.path / shard).is_file():
                problems.append(f"{shard}: tensor {name} listed in the index is not in the shard")
        if problems:
            raise CheckpointError(f"{self.path}: inconsistent sharded checkpoint:\n  " + "\n  ".join(problems))
        return tensors

    def tokenizer(self):
        """The folder's tokenizer.json as a tokenizers.Tokenizer, or None when there is none."""
        from tokenizers import Tokenizer

        f = self.path / "tokenizer.json"
        if not f.is_file():
            return None
        try:
            return Tokenizer.from_file(str(f))
        except Exception as exc:  # tokenizers raises a bare Exception subclass
            raise CheckpointError(f"{f}: not a valid tokenizer.json: {exc}") from None

    def validate(self) -> None:
        """Check every expected tensor's presence, shape and dtype; raise listing ALL problems (an FP8
        weight's block scales first, in one line: check_fp8_scales)."""
        self.check_fp8_scales()
        expected = expected_tensors(self.config)
        packed = expert_dtypes(self.config)
        dense_fmt = self._dense_format()
        problems = []
        accounted: set[str] = set()
        for name, shape in expected.items():
            qnames = None if name in packed else self._quantized_dense(name, shape, dense_fmt)
            if qnames is not None:  # a dense linear stored quantized: dequantized when read
                problems += self._check_dense(name, shape, dense_fmt)
                accounted.update(qnames)
                continue
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name} (expected shape {list(shape)})")
                continue
            if info.shape != shape:
                problems.append(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, "
                                f"expected {list(shape)}")
            if name in packed:
                if info.dtype not in packed[name]:
                    problems.append(f"{info.file.name}: tensor {name} has dtype {info.dtype}, expected "
                                    f"{' or '.join(packed[name])} ({self.config.expert_format})")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"{info.file.name}: tensor {name} has dtype {info.dtype}, "
                                f"expected one of {sorted(FLOAT_DTYPES)}")
        if not problems:
            problems += self._check_expert_values(packed)
        zeros = self._optional_zeros()
        self._check_zeros(zeros)
        accounted.update(zeros)
        head = self.config.family.lm_head
        tied_head = self.config.tie_word_embeddings and head in self.tensors
        for name in sorted(set(self.tensors) - set(expected) - accounted):
            if name == head and tied_head:
                continue  # a tied checkpoint may still carry the (identical) head; it is ignored
            if self.config.family.ignores(self.config, name):
                continue  # e.g. the multi-token-prediction layer shipped after the last layer
            problems.append(f"{self.tensors[name].file.name}: unexpected tensor {name}")
        if problems:
            raise CheckpointError(f"{self.path}: checkpoint does not match config.json "
                                  f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))

    def check_fp8_scales(self) -> None:
        """An FP8 block checkpoint (DeepSeek-V3, Kimi-K2, Qwen3-*-FP8 as published): every float8_e4m3fn
        linear weight the model reads has its `weight_scale_inv` sibling, one float scale per block of
        quantization_config.weight_block_size; else CheckpointError in one line naming the file and the
        tensor. NaN/Inf scales are refused as each is read (Checkpoint.tensor, the hub expert reader)."""
        from .formats.fp8 import Fp8BlockFormat

        fmt = self._dense_format()
        if not isinstance(fmt, Fp8BlockFormat):
            return
        (bn, bk), cfg = fmt.block, self.config
        for name, info in sorted(self.tensors.items()):
            if info.dtype != "F8_E4M3" or cfg.family.ignores(cfg, name):
                continue
            what = f"{info.file}: tensor {name} is float8_e4m3fn {list(info.shape)}"
            if len(info.shape) != 2 or not name.endswith(".weight"):
                raise CheckpointError(f"{what}; {fmt.name} checkpoints store only linear weights [out, in] "
                                      "(<module>.weight) in FP8")
            scale, want = name.removesuffix(".weight") + ".weight_scale_inv", list(fmt.scale_shape(*info.shape))
            s = self.tensors.get(scale)
            if s is None:
                raise CheckpointError(f"{what} without its {scale} (expected {want} float32 or bfloat16: one scale "
                                      f"per {bn}x{bk} block, quantization_config.weight_block_size)")
            if list(s.shape) != want or s.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{s.file}: tensor {scale} is {list(s.shape)} {s.dtype}, expected {want} F32, "
                                      f"BF16 or F16 (one scale per {bn}x{bk} block of {name} {list(info.shape)})")

    def dequantized_linears(self) -> list[str]:
        """The dense linears (attention, dense MLPs, shared experts) stored quantized in the file, which
        Checkpoint.tensor dequantizes into the compute dtype as each is read (the routed experts stay as
        stored); filled by validate()."""
        return sorted(self._dense_quant)

    def _check_dense(self, name: str, shape: tuple[int, ...], fmt) -> list[str]:
        """Problems of a dense linear stored quantized: every tensor of the format present, shapes right."""
        base, out = name.removesuffix(".weight"), []
        for sfx, dt, want in fmt.matrix_specs(*shape):
            info = self.tensors.get(f"{base}.{sfx}")
            if info is None:
                out.append(f"missing tensor {base}.{sfx} (expected shape {list(want)}; {base} is stored {fmt.name})")
            elif info.shape != want:
                out.append(f"{info.file.name}: tensor {info.name} has shape {list(info.shape)}, expected {list(want)} "
                           f"({fmt.name})")
            elif dt in (torch.int32, torch.uint8, torch.float8_e4m3fn) and info.dtype != SAFETENSORS_DTYPE[dt]:
                out.append(f"{info.file.name}: tensor {info.name} has dtype {info.dtype}, expected "
                           f"{SAFETENSORS_DTYPE[dt]} ({fmt.name})")
        if not out:
            self._dense_quant[name] = (base, shape[0], shape[1])
        return out

    def _optional_zeros(self) -> dict[str, tuple[tuple[int, ...], str, Any]]:
        """Tensors present in the file that the format allows beside a quantized linear only when all zero
        (HubFormat.zero_specs: the zero `.bias` AutoGPTQ wrote for bias-free layers), by name: (shape,
        what the linear is, format). Routed experts and the dense linears stored quantized."""
        from .quant.ckpt import hub_format

        cfg, out = self.config, {}
        fmt = hub_format(cfg.expert_format or "")
        if fmt is not None and not fused_packed(cfg):
            i, h = cfg.intermediate_size, cfg.hidden_size
            for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
                for e in range(cfg.num_local_experts):
                    for w, (n, k) in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))):
                        base = cfg.family.expert_name(layer, e, w).removesuffix(".weight")
                        out.update({f"{base}.{sfx}": (shape, "MoE expert", fmt) for sfx, shape in fmt.zero_specs(n, k)})
        dense = self._dense_format()
        for base, n, k in self._dense_quant.values():
            out.update({f"{base}.{sfx}": (shape, "linear", dense) for sfx, shape in dense.zero_specs(n, k)})
        return {name: v for name, v in out.items() if name in self.tensors}

    def _check_zeros(self, zeros: dict[str, tuple[tuple[int, ...], str, Any]]) -> None:
        """The optional all-zero tensors have their shape, a float dtype and every value zero; else
        CheckpointError in one line naming the file and the tensor."""
        for name, (shape, what, fmt) in zeros.items():
            info = self.tensors[name]
            if info.shape != shape or info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} is {list(info.shape)} {info.dtype}, expected "
                                      f"{list(shape)} float ({fmt.name})")
            problem = fmt.zero_problem(name.rsplit(".", 1)[1], self._raw(name), what)
            if problem:
                raise CheckpointError(f"{info.file}: tensor {name}: {problem} ({fmt.name})")

    def _check_expert_values(self, packed: dict[str, tuple[str, ...]]) -> list[str]:
        """Cheap checks of a hub format's index tensors (GPTQ g_idx in range) before any expert is read."""
        from .quant.ckpt import hub_format

        fmt = hub_format(self.config.expert_format or "")
        if fmt is None or not any(sfx == "g_idx" for sfx, *_ in fmt.matrix_specs(64, 64)):
            return []
        out = []
        for name in (n for n in packed if n.endswith(".g_idx")):
            g = self.tensor(name)
            k = g.numel()
            problem = fmt.check_matrix({"g_idx": g}, 0, k)
            if problem:
                out.append(f"{self.tensors[name].file.name}: tensor {name}: {problem} ({fmt.name})")
                if len(out) >= 8:
                    break
        return out

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """Read one tensor from its shard's memory map, converted to dtype/device (a dense linear stored
        quantized: dequantized by the checkpoint's format, in float32, then converted)."""
        if name in self._dense_quant:
            base, n, k = self._dense_quant[name]
            fmt = self._dense_format()
            mats = {sfx: self._raw(f"{base}.{sfx}") for sfx, _, _ in fmt.matrix_specs(n, k)}
            w = fmt.dequant_matrix(mats, n, k)
            check_finite(w, f"{self.path}: dequantized {name}")
            return w.to(device=device, dtype=dtype or torch.float32)
        return self._raw(name).to(device=device, dtype=dtype or None)

    def tensor_row(self, name: str, index: int) -> torch.Tensor:
        """Row `index` of tensor `name`'s first dim (one expert of a fused experts tensor), read alone from
        its shard's memory map, as stored (NaN/Inf refused)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            t = handle.get_slice(name)[index:index + 1][0]
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read row {index} of tensor {name}: {exc}") from None
        check_finite(t, f"{info.file}: tensor {name}[{index}]")
        return t

    def _raw(self, name: str) -> torch.Tensor:
        """One tensor as stored, from its shard's memory map (NaN/Inf refused)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
            t = handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name}: {exc}") from None
        check_finite(t, f"{info.file}: tensor {name}")
        return t

    # --- in place: views of the files' memory maps ------------------------------------------------------
    def file_map(self, file: Path) -> torch.Tensor:
        """`file`'s bytes as one uint8 tensor over a read-only memory map of it (made once, kept: the views
        handed out hold it alive after close()). Never written to: a write would fault."""
        m = self._maps.get(file)
        if m is None:
            try:
                arr = np.memmap(file, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: cannot memory-map: {exc}") from None
            with warnings.catch_warnings():  # torch warns that the (read-only) map is not writable
                warnings.simplefilter("ignore", UserWarning)
                m = self._maps[file] = torch.from_numpy(arr)
        return m

    def mapped_tensor(self, name: str) -> torch.Tensor | None:
        """Tensor `name` as stored, a view of its file's memory map (nothing read, nothing copied; its
        values unchecked), or None where it cannot be one: a dtype torch cannot view, or bytes not aligned
        to its element size."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        dt = _MAP_DTYPE.get(info.dtype)
        if dt is None or info.offset < 0:
            return None
        item = torch.tensor([], dtype=dt).element_size()
        if info.offset % item:
            return None
        n = math.prod(info.shape) * item
        return self.file_map(info.file)[info.offset: info.offset + n].view(dt).view(info.shape)

    def in_map(self, t: Any) -> bool:
        """Whether `t` is a contiguous tensor lying in one of this checkpoint's memory maps (a view of the
        file, not a copy of it)."""
        if not isinstance(t, torch.Tensor) or not t.is_contiguous() or t.device.type != "cpu":
            return False
        base = t.untyped_storage().data_ptr()
        return any(base == m.untyped_storage().data_ptr() for m in self._maps.values())

    def in_place(self, check: bool = False) -> "InPlaceReader":
        """A reader answering tensor() / tensor_row() with views of the files' memory maps (see
        InPlaceReader), for the families' read functions."""
        return InPlaceReader(self, check)

    def fingerprint(self) -> str:
        """Identity of the model from the checkpoint's bytes: sha256 over config.json's parsed config
        and every router and post-attention norm tensor exactly as stored (dtype tag, shape, raw
        bytes). Independent of the compute dtype and device the model is later loaded with."""
        h = hashlib.sha256(json.dumps(self.config.as_dict(), sort_keys=True, default=str).encode())
        for layer in range(self.config.num_hidden_layers):
            for name in identity_names(self.config, layer):
                info = self.tensors.get(name)
                if info is None:
                    raise CheckpointError(f"{self.path}: no tensor named {name}")
                t = self.tensor(name).contiguous()  # as stored: no dtype conversion
                h.update(f"{name}:{info.dtype}:{list(info.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    def iter_names(self) -> Iterator[str]:
        return iter(expected_tensors(self.config))

    @property
    def dtype_name(self) -> str:
        """The checkpoint's weight dtype (that of the embedding), e.g. 'bfloat16'."""
        info = self.tensors.get(self.config.family.model_tensors(self.config)["embed_tokens"][0])
        return FLOAT_DTYPES.get(info.dtype, self.config.torch_dtype) if info else self.config.torch_dtype

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()  # views still handed out keep their map alive


class InPlaceReader:
    """What a family's read function asks of a checkpoint (tensor, tensor_row; config, path, tensors),
    answered with views of the files' memory maps as stored: no copy, no dtype conversion (a tensor that
    cannot be viewed in place, or one asked for in another dtype, is read as Checkpoint.tensor reads it:
    a copy, which the caller sees with Checkpoint.in_map). check: refuse NaN/Inf in each as it is handed
    out (which reads its bytes). `handed` lists every view handed out with the name errors give it."""

    def __init__(self, ckpt: Checkpoint, check: bool = False):
        self.ckpt, self.check = ckpt, check
        self.config, self.path, self.tensors = ckpt.config, ckpt.path, ckpt.tensors
        self.handed: list[tuple[torch.Tensor, str]] = []

    def _hand(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self.check:
            check_finite(t, what)
        self.handed.append((t, what))
        return t

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        t = self.ckpt.mapped_tensor(name) if name not in self.ckpt._dense_quant else None
        if t is None or (dtype is not None and dtype != t.dtype) or torch.device(device).type != "cpu":
            return self.ckpt.tensor(name, dtype, device)
        return self._hand(t, f"{self.ckpt.tensors[name].file}: tensor {name}")

    def tensor_row(self, name: str, index: int) -> torch.Tensor:
        t = self.ckpt.mapped_tensor(name)
        if t is None:
            return self.ckpt.tensor_row(name, index)
        return self._hand(t[index], f"{self.ckpt.tensors[name].file}: tensor {name}[{index}]")


def _group_name(name: str) -> str:
    """A tensor's group: its name without the layer prefix ('<...>.layers.N.') and the expert index ('experts.E.'),
    e.g. 'mlp.experts.w1'."""
    import re

    return re.sub(r"\.experts\.\d+\.", ".experts.", re.sub(r"^.*?\.layers\.\d+\.", "", name))


def save_checkpoint(path: str | os.PathLike, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                    max_shard_bytes: int | None = None) -> None:
    """Write config.json and the weights in the family's hub layout (sharded when asked)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    missing = set(expected_tensors(cfg)) - set(tensors)
    if missing:
        raise CheckpointError(f"save_checkpoint: missing tensors {sorted(missing)[:5]}...")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_FILE), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def open_checkpoint(path: str | os.PathLike) -> "Checkpoint":
    """A model folder (Checkpoint) or a .gguf file (gguf_checkpoint.GgufCheckpoint, the same questions
    answered from the file)."""
    from .gguf_checkpoint import GgufCheckpoint, is_gguf

    return GgufCheckpoint(path) if is_gguf(path) else Checkpoint(path)  # type: ignore[return-value]
