"""How a model runs: `OffloadConfig` (what a user sets) and `Tuning` (everything else).

One frozen dataclass tree. Each field carries its type, default, allowed values and one line of
help in its metadata; construction validates every field once, with an error that names the field,
the value and what would be right. The CLI builds its runtime flags and `--tuning KEY=VALUE` from the
same fields (`FLAG_FIELDS`, `parse_tuning`), so help, ranges and defaults live here only.

Checks that need the model (a cache of 9 slots per layer for 8 experts, a lookahead past the last
layer) are made by `check_against_model` when the model's config is known.

Defaults and the measurement behind each (figures in benchmarks/results/ and lab/README.md):
  policy lru           with the CPU lane (on by default on cuda) prefetch still gains under lru (1.03x
                       geometric mean) and loses under lru-layer (0.90x): hybrid_prefetch_lru.json,
                       hybrid_prefetch.json; without the lane the policies are within 0.01-0.03 hit rate
                       of each other (bench_cache_*.json)
  lookahead 2          the bundled adapters' recall falls 0.910 / 0.884 / 0.866 at d = 1 / 2 / 3 while
                       a copy needs several layers of lead; cross-token adapters use their whole range
  prefetch_margin 0/3  3 only for cross-token plans with the CPU lane (1.06-1.12x, hybrid_prefetch.json)
  link_chunk_mb 8      the chunked link beats whole-expert FIFO copies (7.43 vs 7.18 tok/s, 8.99 vs 8.30
                       with cross-token plans; lab/README.md); 8 MiB is ~0.3 ms of PCIe 4, 1/11 of an int4
                       Mixtral-8x7B expert
  cpu_experts auto     misses computed on the host when that beats the copy: 7.28 -> 10.50 tok/s
  (on cuda)            projected (simulate_lane_mixtral8x7b.json)
  draft_tokens 4       a cap: the decoder adapts below it from measured acceptance, which on the bundled
                       model falls 0.49 / 0.38 / 0.20 / 0.0 by position (speculative.json)
  cpu_activations auto int8 activations for bf16 compute: decode of the 734M model with int4 g32 experts 44.1 vs
                       34.6 tok/s, int8 47.6 vs 44.3 (cpu_vs_llamacpp.json); held-out perplexity +0.015
                       through the decode kernels (quant_ppl.json, "decode kernels" rows); float32 stays exact
  threads              the physical cores, as llama.cpp's -t: 2 threads on the 2-core reference machine
                       (benchmarks/cpu_vs_llamacpp.py --threads 1 / 2 records both)
  attention peek off   (train-accelerator) one extra attention per predicted layer: -5-15% tok/s with the
                       CPU lane, <1% gain without (peek_cost_sim.json)
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Iterable

from .errors import MoeOffloadError

POLICIES = ("lru", "lru-layer", "lfu", "predictive")
PREDICTORS = ("auto", "none", "next-gate", "m2r2")
EXPERT_DTYPES = ("auto", "bf16", "fp16", "int8", "int4", "int4-asym")
INT4 = ("int4", "int4-asym")  # the formats with groups (tuning.group_size)
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
MOE_BACKENDS = ("auto", "triton", "grouped_mm", "loop")
CPU_EXPERTS = ("auto", "off")
DENSE_DTYPES = ("auto", "int8")
CPU_ACTIVATIONS = ("auto", "int8", "exact")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
DEFAULT_LINK_CHUNK_MB = 8.0
MIN_LINK_CHUNK_MB = 1 / 1024  # 1 KiB: smaller chunks cost more per-chunk overhead than they save
DEFAULT_DRAFT_TOKENS = 4


def _opt(help: str, default: Any = None, *, kind: type | tuple = str, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, choices: tuple | None = None,
         nullable: bool = True) -> Any:
    """A dataclass field with its validation rule and help in the metadata."""
    meta = dict(help=help, kind=kind, lo=lo, hi=hi, lo_open=lo_open, choices=choices, nullable=nullable)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Tuning:
    """Settings a measurement chose a default for; change them to benchmark or in unusual set-ups."""

    cache_experts: int | None = _opt("expert slots over all layers (instead of cache_per_layer / cache_gb)",
                                     kind=int, lo=1)
    policy: str = _opt("expert-cache eviction policy", "lru", choices=POLICIES, nullable=False)
    group_size: int | None = _opt(f"int4 group size along the input dimension (default {DEFAULT_GROUP_SIZE}; "
                                  "int4 experts only)", kind=int, choices=GROUP_SIZES)
    max_seq_len: int | None = _opt("context length the KV cache holds (default min(max_position_embeddings, 4096))",
                                   kind=int, lo=1)
    moe_backend: str = _opt("expert compute: auto = triton on cuda, loop on cpu (triton on cpu needs "
                            "TRITON_INTERPRET=1)", "auto", choices=MOE_BACKENDS, nullable=False)
    lookahead: int | None = _opt("layers ahead to predict and prefetch (default 2; cross-token m2r2 adapters: "
                                 "their whole range)", kind=int, lo=1)
    prefetch_margin: int | None = _opt("prefetch top-(k + margin) experts per predicted layer (default 0; 3 with "
                                       "cross-token adapters and the CPU lane)", kind=int, lo=0)
    link_chunk_mb: float = _opt("prefetch copies move in chunks of this many MiB so a demand copy overtakes them",
                                DEFAULT_LINK_CHUNK_MB, kind=float, lo=MIN_LINK_CHUNK_MB, hi=4096.0, nullable=False)
    draft_tokens: int | None = _opt(f"most draft tokens per verify pass with speculative (default "
                                    f"{DEFAULT_DRAFT_TOKENS})", kind=int, lo=1, hi=64)
    show_progress: bool = _opt("progress bars while loading weights", False, kind=bool, nullable=False)

    def __post_init__(self) -> None:
        _validate(self, "tuning.")


@dataclass(frozen=True)
class OffloadConfig:
    """What a user sets; `tuning` holds the rest. Validated on construction.

    Build one directly, or from flat names with `OffloadConfig.make(policy="lfu", cache_per_layer=4)`.
    """

    device: Any = _opt("auto (cuda if available), cpu, cuda or cuda:N", "auto", kind=(str, "device"), nullable=False)
    dtype: Any = _opt("compute dtype; auto = float32 on cpu (bfloat16 for a GGUF file on an AVX512-VNNI CPU), "
                      "the checkpoint's half type on cuda", "auto", kind=(str, "dtype"), choices=DTYPE_NAMES,
                      nullable=False)
    offload: bool | None = _opt("experts in host RAM with a device expert cache (default: on for cuda; on cpu only "
                                "when a cache or prefetch setting is given, since host RAM is the device there)",
                                kind=bool)
    cache_per_layer: int | None = _opt("expert slots per layer, top-k..experts (default: fill free device memory)",
                                       kind=int, lo=1)
    cache_gb: float | None = _opt("gigabytes of expert slots on the device", kind=float, lo=0.0, lo_open=True)
    expert_dtype: str = _opt("expert storage: auto (the compute dtype or the checkpoint's packed format), bf16, "
                             "fp16, int8 (per-row scales), int4 (symmetric groups, what transformers and "
                             "compressed-tensors load) or int4-asym (groups with zero points: lower perplexity, "
                             "23.253 vs 23.325 at g128 on the bundled model), quantized on load",
                             "auto", choices=EXPERT_DTYPES, nullable=False)
    predictor: str = _opt("prefetch predictor: auto (m2r2 with the bundled/given adapters, else next-gate), none, "
                          "next-gate or m2r2", "auto", choices=PREDICTORS, nullable=False)
    accelerator: str | None = _opt("M2R2 adapter file (.safetensors) for predictor m2r2 and speculative decoding",
                                   kind=(str, "path"))
    cpu_experts: str | None = _opt("auto: compute a missed expert on the CPU when that beats copying it; off: copy "
                                   "every miss (default: auto on cuda, off on cpu)", choices=CPU_EXPERTS)
    speculative: bool = _opt("self-speculative decoding with the adapter file's draft head", False, kind=bool,
                             nullable=False)
    dense_dtype: str = _opt("dense weights (attention projections, LM head): auto = the compute dtype; int8 = one "
                            "scale per row, run by the CPU decode kernels (cpu only; what a q8_0 GGUF does)",
                            "auto", choices=DENSE_DTYPES, nullable=False)
    cpu_activations: str = _opt("what quantized weights (int8, int4, GGUF, MXFP4) multiply against on the CPU: "
                                "int8 = activations rounded to int8 per block of 32 (llama.cpp's method, "
                                "AVX512-VNNI; int4 decode 1.27x, int8 1.07x on a 734M model), exact = the compute "
                                "dtype; auto = int8 for bf16/fp16 compute, exact for float32", "auto",
                                choices=CPU_ACTIVATIONS, nullable=False)
    threads: int | None = _opt("CPU threads for compute (torch.set_num_threads; default: the physical cores, within "
                               "the CPU affinity and cgroup CPU quota, unless OMP_NUM_THREADS is set)", kind=int, lo=1)
    tuning: Tuning = field(default_factory=Tuning, metadata=dict(help="the rest (see Tuning)", kind=Tuning))

    def __post_init__(self) -> None:
        if not isinstance(self.tuning, Tuning):
            raise MoeOffloadError(f"tuning must be a moe_offload.Tuning, got {type(self.tuning).__name__}")
        _validate(self, "")
        budgets = [n for n, v in (("cache_per_layer", self.cache_per_layer), ("cache_gb", self.cache_gb),
                                  ("tuning.cache_experts", self.tuning.cache_experts)) if v is not None]
        if len(budgets) > 1:
            raise MoeOffloadError(f"give at most one cache budget, got {' and '.join(budgets)}")
        asked = self.cache_options()
        if self.offload is False and asked:
            raise MoeOffloadError(f"{', '.join(asked)}: settings of the expert cache, which offload=False does "
                                  "not have; drop them or set offload=True")
        if self.tuning.group_size is not None and self.expert_dtype not in INT4 + ("auto",):
            raise MoeOffloadError(f"tuning.group_size={self.tuning.group_size} applies to int4 experts only; "
                                  f"expert_dtype is {self.expert_dtype!r}")
        if self.tuning.draft_tokens is not None and not self.speculative:
            raise MoeOffloadError("tuning.draft_tokens needs speculative=True")
        if self.predictor == "none":
            tuned = [f"tuning.{n}" for n in ("lookahead", "prefetch_margin") if getattr(self.tuning, n) is not None]
            if tuned:
                raise MoeOffloadError(f"{', '.join(tuned)}: settings of the prefetcher, which predictor='none' "
                                      "does not run; drop them or choose a predictor")
        if self.dense_dtype == "int8" and self.speculative:
            raise MoeOffloadError("dense_dtype int8 and speculative: the draft head reads the LM head in the compute "
                                  "dtype; drop one of them")
        if self.accelerator is not None and self.predictor in ("none", "next-gate") and not self.speculative:
            raise MoeOffloadError(f"accelerator is read by predictor 'm2r2' (or 'auto') and speculative decoding; "
                                  f"predictor is {self.predictor!r}: drop it or change the predictor")

    def cache_options(self) -> list[str]:
        """The options given that only an expert cache and its prefetcher use: with offload unset they
        turn offloading on (on cpu, where it is off by default); with offload=False they are an error."""
        asked = [n for n in ("cache_per_layer", "cache_gb") if getattr(self, n) is not None]
        asked += ["cpu_experts"] if self.cpu_experts == "auto" else []
        t, default = self.tuning, Tuning()
        asked += [f"tuning.{n}" for n in ("cache_experts", "lookahead", "prefetch_margin") if getattr(t, n) is not None]
        asked += [f"tuning.{n}" for n in ("policy", "link_chunk_mb") if getattr(t, n) != getattr(default, n)]
        if self.accelerator is not None and not self.speculative:
            asked.append("accelerator")
        if self.predictor not in ("auto", "none"):
            asked.append("predictor")
        return asked

    @property
    def group_size(self) -> int:
        return self.tuning.group_size or DEFAULT_GROUP_SIZE

    @classmethod
    def make(cls, **settings: Any) -> "OffloadConfig":
        """An OffloadConfig from flat names: any OffloadConfig or Tuning field."""
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> "OffloadConfig":
        """A copy with these fields changed; names may be OffloadConfig or Tuning fields (or `tuning`,
        a whole Tuning that the Tuning fields given alongside then change)."""
        base = settings.pop("tuning", self.tuning)
        if not isinstance(base, Tuning):
            raise MoeOffloadError(f"tuning must be a moe_offload.Tuning, got {type(base).__name__}")
        top, tune = _split(settings)
        return replace(self, **top, tuning=replace(base, **tune) if tune else base)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (strings for devices and dtypes), tuning nested."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "tuning"}
        out["tuning"] = {f.name: getattr(self.tuning, f.name) for f in fields(Tuning)}
        return out


TOP_FIELDS = {f.name: f for f in fields(OffloadConfig) if f.name != "tuning"}
TUNING_FIELDS = {f.name: f for f in fields(Tuning)}

# CLI flag -> OffloadConfig field: the runtime flags every model-loading command shares. The rest of the
# config is reached with --tuning KEY=VALUE (any Tuning field, or an OffloadConfig field without a flag).
FLAG_FIELDS = {"--device": "device", "--dtype": "dtype", "--expert-dtype": "expert_dtype",
               "--cache-per-layer": "cache_per_layer", "--cache-gb": "cache_gb", "--predictor": "predictor",
               "--accelerator": "accelerator", "--cpu-experts": "cpu_experts", "--threads": "threads",
               "--dense-dtype": "dense_dtype", "--cpu-activations": "cpu_activations"}


def _split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    top, tune = {}, {}
    for name, value in settings.items():
        if name in TOP_FIELDS:
            top[name] = value
        elif name in TUNING_FIELDS:
            tune[name] = value
        else:
            raise MoeOffloadError(f"unknown setting {name!r}{_suggest(name, list(TOP_FIELDS) + list(TUNING_FIELDS))}")
    return top, tune


def _suggest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), list(names), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(names))}"


def _close(name: str, names: Iterable[str]) -> str:
    """"; did you mean 'x'?" for a near miss among names already listed, else nothing."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value).removeprefix("torch.")


def _validate(obj: Any, prefix: str) -> None:
    """Check and normalise every field of a frozen dataclass against its metadata."""
    for f in fields(obj):
        meta = f.metadata
        if "lo" not in meta:
            continue
        value = getattr(obj, f.name)
        object.__setattr__(obj, f.name, _check(prefix + f.name, value, meta))


def _check(name: str, value: Any, meta: dict[str, Any]) -> Any:
    if value is None:
        if meta["nullable"]:
            return None
        raise MoeOffloadError(f"{name} must not be None")
    kind = meta["kind"]
    special = kind[1] if isinstance(kind, tuple) else None
    if special == "device":
        return _device(name, value)
    if special == "dtype":
        return _dtype(name, value)
    if special == "path":
        if not isinstance(value, (str, os.PathLike)):
            raise MoeOffloadError(f"{name} must be a file path (str or os.PathLike), got {value!r} "
                                  f"({type(value).__name__})")
        return str(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise MoeOffloadError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise MoeOffloadError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise MoeOffloadError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
        value = float(value)
    elif not isinstance(value, str):
        raise MoeOffloadError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise MoeOffloadError(f"{name} must be one of {list(meta['choices'])}, got {value!r}"
                              + (_close(value, meta["choices"]) if isinstance(value, str) else ""))
    lo, hi, lo_open = meta["lo"], meta["hi"], meta["lo_open"]
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise MoeOffloadError(f"{name} must be {_range(lo, hi, lo_open)}, got {value}")
    return value


def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    return f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"<= {hi}"


def _device(name: str, value: Any) -> Any:
    import torch

    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
        raise MoeOffloadError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def _dtype(name: str, value: Any) -> Any:
    import torch

    allowed = {torch.float32, torch.float16, torch.bfloat16}
    if isinstance(value, torch.dtype):
        if value not in allowed:
            raise MoeOffloadError(f"{name} {value} is not supported; use one of {list(DTYPE_NAMES)}")
        return value
    if value not in DTYPE_NAMES:
        raise MoeOffloadError(f"{name} must be one of {list(DTYPE_NAMES)}, got {value!r}"
                              + (_close(value, DTYPE_NAMES) if isinstance(value, str) else ""))
    return value


# --- text settings (--tuning KEY=VALUE, a JSON file) ------------------------------------------------------
def parse_tuning(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (or paths to JSON files holding an object of keys) -> typed settings.

    Keys are Tuning fields or OffloadConfig fields; values are parsed by the field's type ('none' is
    None where a field allows it). Errors name the item and what would be right."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            given = _json_settings(item)
        else:
            key, text = item.split("=", 1)
            key = key.strip().replace("-", "_")
            f = TUNING_FIELDS.get(key) or TOP_FIELDS.get(key)
            if f is None:
                raise MoeOffloadError(f"--tuning {item!r}: unknown key {key!r}"
                                      f"{_suggest(key, list(TUNING_FIELDS) + list(TOP_FIELDS))}")
            given = {key: _from_text(f"--tuning {key}", text.strip(), f.metadata)}
        twice = sorted(set(given) & set(out))
        if twice:
            raise MoeOffloadError(f"--tuning: {', '.join(twice)} given more than once; give each setting once")
        out.update(given)
    return out


def _json_settings(path: str) -> dict[str, Any]:
    from .validate import json_object

    raw = json_object(path, "--tuning expects KEY=VALUE or a JSON file of settings; no such file")
    try:  # names and each value here, so the error names the file; combinations once all settings are in
        _split(raw)
        for key, value in raw.items():
            f = TUNING_FIELDS.get(key) or TOP_FIELDS[key]
            if "lo" in f.metadata:
                _check(("tuning." if key in TUNING_FIELDS else "") + key, value, f.metadata)
    except MoeOffloadError as exc:
        raise MoeOffloadError(f"--tuning {path}: {exc}") from None
    return raw


def _from_text(name: str, text: str, meta: dict[str, Any]) -> Any:
    kind = meta["kind"]
    if text.lower() in ("none", "null") and meta["nullable"]:
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        what = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise MoeOffloadError(f"{name}: expected {what}, got {text!r}") from None
    return text


def tuning_help() -> str:
    """One line per setting: name, default, allowed values, help (`--tuning help`)."""
    lines = ["settings for --tuning KEY=VALUE (repeatable; each key once) or --tuning FILE.json (an object of",
             "them); any OffloadConfig field is accepted too (those with a flag of their own are listed by --help).",
             "A default of '-' is chosen at load, as the help says:"]
    for f in list(TUNING_FIELDS.values()) + [f for n, f in TOP_FIELDS.items() if n not in FLAG_FIELDS.values()]:
        m = f.metadata
        allowed = (list(m["choices"]) if m["choices"] else
                   _range(m["lo"], m["hi"], m["lo_open"]) if m["lo"] is not None or m["hi"] is not None else "")
        default = "-" if f.default is MISSING or f.default is None else f.default
        lines.append(f"  {f.name:16s} default {default!s:8s} {str(allowed):28s} {m['help']}")
    return "\n".join(lines)


def check_against_model(config: OffloadConfig, num_layers: int, num_experts: int, top_k: int) -> None:
    """The ranges that depend on the model: slots per layer, prefetch margin, lookahead."""
    if config.cache_per_layer is not None and not top_k <= config.cache_per_layer <= num_experts:
        raise MoeOffloadError(f"cache_per_layer must be in [{top_k}, {num_experts}] for this model (top-{top_k} of "
                              f"{num_experts} experts per layer), got {config.cache_per_layer}")
    t = config.tuning
    if t.cache_experts is not None and not top_k <= t.cache_experts <= num_layers * num_experts:
        raise MoeOffloadError(f"tuning.cache_experts must be in [{top_k}, {num_layers * num_experts}] for this model "
                              f"({num_layers} layers x {num_experts} experts), got {t.cache_experts}")
    if t.prefetch_margin is not None and t.prefetch_margin > num_experts - top_k:
        raise MoeOffloadError(f"tuning.prefetch_margin must be in [0, {num_experts - top_k}] for this model "
                              f"(top-{top_k} of {num_experts}), got {t.prefetch_margin}")
    if t.lookahead is not None and t.lookahead > 2 * num_layers:
        raise MoeOffloadError(f"tuning.lookahead must be in [1, {2 * num_layers}] for this model ({num_layers} "
                              f"layers; past {num_layers} only cross-token m2r2 adapters predict), got {t.lookahead}")
