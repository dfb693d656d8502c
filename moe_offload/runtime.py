"""OffloadedModel and load(): the Python API."""

from __future__ import annotations

import numbers
import os

import itertools
import time
import warnings
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil
import torch
from tokenizers import Tokenizer

from .checkpoint import open_checkpoint
from .config import ModelConfig, RuntimeConfig, resolve_device, resolve_dtype
from .errors import ConfigError, MoeOffloadError
from .guard import CallGuard
from .generate import (GenerationResult, GenerationStream, SamplingParams, TextStreamer, _Timing,
                       decode_tokens)
from .kernels import cpu_gemv, resolve_moe_backend
from .kernels.quant_cpu import release_freed_memory
from .model.layers import store_int8_rows
from .model.observers import UsageCounter
from .model.transformer import KVCache, MoeModel
from .formats import FloatFormat, choose_format, loop_only
from .formats.int8 import quantize_int8
from .model.moe import expert_activation
from .offload.packed import PackedResidentExperts
from .offload.cpu_lane import build_cpu_lane
from .offload.link import link_chunk_bytes
from .options import DEFAULT_DRAFT_TOKENS, INT4, OffloadConfig, check_against_model
from .offload import (CacheBudget, ExpertCache, HostExpertStore, MemoryPlan, OffloadedExperts, Prefetcher,
                      make_copy_engine, make_policy, plan_memory)

DEFAULT_MAX_SEQ_LEN = 4096


def bundled_model_path() -> Path:
    """The folder of the small model shipped with the package (HF Mixtral layout)."""
    return Path(str(resources.files("moe_offload") / "assets" / "tiny-mixtral"))


def bundled_accelerator_path() -> Path:
    """M2R2 adapters trained for the bundled model (see `moe-offload train-accelerator`)."""
    return Path(str(resources.files("moe_offload") / "assets" / "tiny-mixtral-accelerator.safetensors"))


def bundled_heldout_text() -> Path:
    """Held-out text (KJV chapters the bundled model never saw in training), for benchmarks."""
    return Path(str(resources.files("moe_offload") / "assets" / "heldout_kjv.txt"))


class OffloadedModel:
    """A loaded Mixtral: `generate()` text, `logits()` of a fresh sequence, `config` of the model."""

    def __init__(self, path: Path, model: MoeModel, runtime: RuntimeConfig,
                 tokenizer: Tokenizer | None, memory_plan: MemoryPlan | None = None,
                 offload_config: OffloadConfig | None = None):
        self.path = path
        self.offload_config = offload_config or OffloadConfig()  # as asked, before "auto" was resolved
        self.memory_plan = memory_plan
        self.expert_cache: ExpertCache | None = (model.experts.cache if isinstance(model.experts, OffloadedExperts)
                                                 else None)
        self.model = model
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.cfg
        self.kv_cache = KVCache(model.cfg, 1, runtime.max_seq_len, runtime.dtype, runtime.device)
        self.usage = UsageCounter(model.cfg.num_moe_layers, model.cfg.num_local_experts, runtime.device)
        model.observers.append(self.usage)
        self.guard = CallGuard()  # serializes generate/logits/stream steps (guard.py)
        self.guard.on_error = self._recover
        self._retries0 = 0
        self.speculative = None  # speculative.SpeculativeDecoder when load(..., speculative=True)

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.model.experts.prefetcher if self.expert_cache is not None else None

    def close(self) -> None:
        """Stop the expert cache's copy engine (its thread on cpu). The model is unusable afterwards."""
        if self.expert_cache is not None:
            self.expert_cache.close()

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"OffloadedModel({str(self.path)!r}, layers={c.num_hidden_layers}, experts="
                f"{c.num_local_experts}, top_k={c.num_experts_per_tok}, device={self.runtime.device}, "
                f"dtype={str(self.runtime.dtype).removeprefix('torch.')}, moe_backend={self.runtime.moe_backend}, "
                f"expert_slots={self.expert_cache.num_slots if self.expert_cache else 'all (no offload)'})")

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> token ids, with the model's BOS token first where its family's tokenizer adds one
        (Mixtral; Qwen and OLMoE tokenizers add none)."""
        if self.tokenizer is None:
            raise MoeOffloadError(f"{self.path}: no tokenizer.json, so text prompts cannot be encoded; "
                                  "pass a list of token ids instead")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.bos_token_id if self.config.prepends_bos else None
        return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids

    def encode_text(self, text: str) -> list[int]:
        """A long text -> token ids: each blank-line-separated paragraph encoded with its own BOS."""
        return [i for para in text.split("\n\n") if para.strip() for i in self.encode(para.strip("\n"))]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _check_ids(self, ids: Any, what: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise MoeOffloadError(f"{what} must be 1-D [T], got shape {list(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not ids:
            raise MoeOffloadError(f"{what} must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        for pos, t in enumerate(ids):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab:
                raise MoeOffloadError(f"{what}: token id {t!r} at position {pos} is out of range "
                                      f"[0, {vocab}) for this model's vocabulary")
        if len(ids) > self.runtime.max_seq_len:
            raise MoeOffloadError(
                f"{what} has {len(ids)} tokens but the context holds {self.runtime.max_seq_len} "
                f"(max_seq_len; the model allows up to {self.config.max_position_embeddings})")
        return [int(t) for t in ids]

    # --- compute --------------------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] (float32, on the model's device) of a fresh sequence of token ids."""
        ids = self._check_ids(input_ids, "input_ids")
        x = torch.tensor([ids], dtype=torch.long, device=self.runtime.device)
        call = object()
        with self.guard.hold(call, "logits"):
            self._reset_stats()
            self.guard.claim_kv(call)
            with torch.inference_mode():
                return self.model(x, 0, self.kv_cache)[0].float()

    def generate(self, prompt: str | Sequence[int] | list[str | Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                 callback: Callable[[str], None] | None = None, max_batch: int = 8
                 ) -> GenerationResult | GenerationStream | list[GenerationResult]:
        """Generate from a text or token-id prompt, or from a list of them (batched decoding: returns a
        list of GenerationResult, up to `max_batch` sequences decoding together; see moe_offload.batch).

        Greedy when temperature is 0; otherwise samples (top_p nucleus, seed for reproducibility).
        Stops at EOS, max_new_tokens or the end of the context. Returns a GenerationResult with .text,
        .token_ids (new tokens), .prompt_token_ids, .finish_reason, .stats; with stream=True returns a
        GenerationStream that yields text deltas and has .result once exhausted. `callback(delta)` is
        called with each text delta as well.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], numbers.Integral):
            from .batch import generate_batch

            return generate_batch(self, [self._check_ids(self.encode(p) if isinstance(p, str) else p,
                                                         f"prompt {i}") for i, p in enumerate(prompt)],
                                  params, max_batch)
        prompt_ids = self._check_ids(self.encode(prompt) if isinstance(prompt, str) else prompt, "prompt")
        holder = GenerationStream(iter(()))
        holder._chunks = self._run(prompt_ids, params, holder, callback)
        if stream:
            return holder
        with self.guard.hold(holder, "generate"):  # the whole call: no other call cuts in
            for _ in holder:
                pass
        assert holder.result is not None
        return holder.result

    def _run(self, prompt_ids: list[int], params: SamplingParams, holder: GenerationStream,
             callback: Callable[[str], None] | None) -> Iterator[str]:
        t0 = time.perf_counter()
        timing = _Timing()
        guard = self.guard
        with guard.hold(holder, "generate"):
            self._reset_stats()
            guard.claim_kv(holder)
        streamer = TextStreamer(self.decode)
        if self.speculative is not None:
            tokens = _refuse_stale(self.speculative.tokens(self.kv_cache, prompt_ids, params,
                                                           self.config.eos_token_ids, timing),
                                   lambda: guard.kv_owner is not holder)
        else:
            tokens = decode_tokens(self.model, self.kv_cache, prompt_ids, params, self.config.eos_token_ids,
                                   timing, is_stale=lambda: guard.kv_owner is not holder)
        deltas = itertools.chain(map(streamer.push, tokens), (streamer.finish() for _ in (0,)))
        while True:
            with guard.hold(holder, "generate"):  # one step (and its callback) at a time
                delta = next(deltas, None)
                guard.claim_kv(holder)
                if delta and callback:
                    callback(delta)
            if delta is None:
                break
            if delta:
                yield delta
        seconds = time.perf_counter() - t0
        new = streamer.ids
        holder.result = GenerationResult(
            text=streamer.text, token_ids=new, prompt_token_ids=prompt_ids, finish_reason=timing.finish_reason,
            seconds=seconds, tokens_per_second=len(new) / seconds if seconds > 0 else 0.0,
            stats=self._stats(timing))
        release_freed_memory()  # the call's activations and logits (734M int4: ~19 MB resident; ~1 ms)

    def _recover(self) -> None:
        """After an exception anywhere in a step: no pin, slot or copy is left dangling (see
        ExpertCache.recover), the prefetch plan is dropped; the next call runs as on a fresh model."""
        if self.expert_cache is not None:
            self.expert_cache.recover()
            if self.prefetcher is not None:
                self.prefetcher.reset()

    def _reset_stats(self) -> None:
        self.usage.reset()
        if self.speculative is not None:
            self.speculative.reset()
        if self.expert_cache is not None:
            self.expert_cache.reap()
            self.expert_cache.drain_stalls()
            self.expert_cache.reset_stats()
            self._retries0 = self.expert_cache.engine.retries
            pf = self.prefetcher
            if pf is not None:
                pf.issued = pf.cancelled = 0

    def _stats(self, timing: _Timing) -> dict[str, Any]:
        usage = self.usage.counts.cpu()  # [L, E]
        return {
            "prefill_tokens": timing.prefill_tokens,
            "prefill_seconds": timing.prefill_seconds,
            "decode_tokens": timing.decode_tokens,
            "decode_seconds": timing.decode_seconds,
            "decode_tokens_per_second": timing.decode_tokens / timing.decode_seconds
            if timing.decode_seconds > 0 else 0.0,
            "expert_uses": usage.tolist(),  # routed (token, k) assignments per [layer][expert]
            "offload": self.expert_cache is not None,
            # resident packed experts of a file's memory map (GGUF) copied into RAM for the CPU kernels: their
            # bytes (0: read from the map, or not a mapped store)
            "experts_ram_copy_bytes": getattr(self.model.experts, "ram_copy_bytes", 0),
            "speculative": self.speculative is not None,
            **(self.speculative.stats_dict() if self.speculative is not None else {}),
            **(self.cache_stats() if self.expert_cache is not None else {}),
        }

    def store_info(self) -> dict[str, Any]:
        """The host expert store, as `moe-offload info --json` reports it under expert_store (one function:
        offload.store_info.expert_store_info): format, one_expert_bytes, host_bytes, mapped, and the
        checkpoint's file_expert_bytes / tensor_groups where it knows them."""
        from .offload.store_info import expert_store_info

        store = getattr(self.model.experts, "store", None)  # packed resident experts
        store = self.expert_cache.store if self.expert_cache is not None else store
        if store is None:
            raise MoeOffloadError("this model's experts are resident in the compute dtype: there is no host "
                                  "expert store")
        return expert_store_info(open_checkpoint(self.path), store)

    def cache_stats(self) -> dict[str, Any]:
        """Expert-cache counters since the last generate()/logits() call (totals and per_layer; a memory-
        mapped store's page-cache misses: page_cache, page_cache_checked_bytes, page_cache_miss_bytes)."""
        cache = self.expert_cache
        if cache is None:
            raise MoeOffloadError("this model was loaded with offload=False: there is no expert cache")
        cache.drain_stalls()
        cache.stats.check()
        pf = self.prefetcher
        return {**cache.stats.to_dict(), "capacity_slots": cache.num_slots,
                "policy": cache.policy.name, "predictor": pf.predictor.name if pf else "none",
                "lookahead": pf.lookahead if pf else 0,
                "prefetch_issued": pf.issued if pf else 0, "prefetch_cancelled": pf.cancelled if pf else 0,
                "copy_retries": cache.engine.retries - self._retries0}


def _refuse_stale(tokens: Iterator[int], is_stale: Callable[[], bool]) -> Iterator[int]:
    """A speculative stream cannot re-prefill itself after another call used the KV cache: it stops with
    a clear error rather than ever yielding a token computed on someone else's cache."""
    for tok in tokens:
        yield tok
        if is_stale():
            raise MoeOffloadError("a speculative stream cannot be resumed after another call on the same model "
                                  "used it; consume it first, or load a second model")


def load(path: str | Path | None = None, config: OffloadConfig | None = None, *,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         offload: bool | None = None, cache_per_layer: int | None = None, predictor: str | None = None,
         expert_dtype: str | None = None) -> OffloadedModel:
    """Load a Hugging Face MoE folder (or the bundled model when path is None).

    config: an OffloadConfig (default: OffloadConfig()); the keywords are shortcuts that replace its
    field of the same name when given (not None). device: "auto" (cuda if available, else cpu), "cpu"
    or "cuda[:N]". dtype: "auto" (float32 on cpu, bfloat16 there for a GGUF file where the CPU has
    AVX512-VNNI; the checkpoint's half type on cuda), "float32", "float16" or "bfloat16". The checkpoint
    is validated completely before any weight is read.
    """
    if config is None:
        config = OffloadConfig()
    elif not isinstance(config, OffloadConfig):
        raise MoeOffloadError(f"config must be a moe_offload.OffloadConfig, got {type(config).__name__} (build one "
                              "with OffloadConfig(...) or OffloadConfig.make(name=value, ...))")
    shortcuts = dict(device=device, dtype=dtype, offload=offload, cache_per_layer=cache_per_layer,
                     predictor=predictor, expert_dtype=expert_dtype)
    config = config.replace(**{k: v for k, v in shortcuts.items() if v is not None})
    if isinstance(path, OffloadConfig):
        raise MoeOffloadError("the first argument of load() is the model path; pass the config as load(path, config) "
                              "or load(config=...)")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise MoeOffloadError(f"path must be a model folder (str or os.PathLike) or None, got {path!r}")
    path = Path(path) if path is not None else bundled_model_path()
    ckpt = open_checkpoint(path)  # a model folder, or a .gguf file
    cfg = ckpt.config
    why = cfg.family.unsupported(cfg)
    if why:  # parsed for `info` and `simulate`, not runnable: refused before a weight is read
        raise ConfigError(why)
    check_against_model(config, cfg.num_moe_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    tune = config.tuning
    set_threads(config.threads)
    set_cpu_activations(config.cpu_activations)
    dev = resolve_device(config.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # kernels launch on the current device, and bf16 support is asked of it
    dt = resolve_dtype(config.dtype, dev, ckpt.dtype_name, gguf_bf16(ckpt, dev, config.dtype, cpu_gemv.has_vnni))
    max_seq_len = tune.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len > cfg.max_position_embeddings:
        raise MoeOffloadError(f"tuning.max_seq_len must be in [1, {cfg.max_position_embeddings}] for this model "
                              f"(its max_position_embeddings), got {max_seq_len}")
    try:
        backend = resolve_moe_backend(tune.moe_backend, dev, dt, cfg.hidden_size, cfg.intermediate_size)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    runtime = RuntimeConfig(device=dev, dtype=dt, max_seq_len=max_seq_len, moe_backend=backend,
                            show_progress=tune.show_progress)
    ckpt.validate()  # every problem reported before a single weight is read
    tokenizer = ckpt.tokenizer()  # a folder's tokenizer.json, or a GGUF file's own vocabulary
    experts, plan = None, None
    policy = make_policy(tune.policy)
    offload = config.offload
    if offload is None:  # on cpu, host RAM is the device (OffloadConfig.offload), unless the cache is asked for
        offload = dev.type == "cuda" or bool(config.cache_options())
    expert_dtype, group_size = _expert_storage(config, cfg, path)
    own_experts = cfg.expert_bias or cfg.swiglu_limit is not None  # GPT-OSS's: biases, the clamped SwiGLU
    if tune.moe_backend == "auto" and (loop_only(expert_dtype) or own_experts):
        backend = "loop"  # auto: the one backend that runs GGUF / hub formats (the Triton kernel has none yet)
        runtime = replace(runtime, moe_backend=backend)
    if own_experts:
        fmt = _own_expert_format(cfg, expert_dtype, dt, backend, ckpt)
    else:
        fmt = choose_format(expert_dtype, group_size, dt, backend)  # the expert format's strategy object
    runtime = replace(runtime, expert_format=fmt.name if fmt.quantized else None)
    from .offload.plan import check_load_ram  # host RAM for what is copied, refused before any allocation
    from .offload.store import reads_in_place
    # a store that reads the file's memory map in place (GGUF; safetensors rows as stored) needs no RAM copy
    mapped = (offload or fmt.quantized) and reads_in_place(ckpt, fmt, dt, pin=offload and dev.type == "cuda")
    check_load_ram(cfg, fmt, dt, dev, offload, mapped=mapped)
    if fmt.quantized and not offload:
        store = HostExpertStore.from_checkpoint(ckpt, dt, show_progress=runtime.show_progress, fmt=fmt)
        item = torch.tensor([], dtype=dt).element_size()  # what the model holds beside the experts
        rest = (cfg.dense_params + cfg.kv_elements_per_token * max_seq_len) * item
        experts = PackedResidentExperts(store, dev, backend, show_progress=runtime.show_progress, reserve_bytes=rest)
    if offload:
        budget = CacheBudget(tune.cache_experts, config.cache_per_layer, config.cache_gb)
        plan = plan_memory(cfg, dev, dt, max_seq_len, budget, policy.per_layer, fmt)
        store = HostExpertStore.from_checkpoint(ckpt, dt, pin=dev.type == "cuda", show_progress=runtime.show_progress,
                                                fmt=fmt)
        chunk = link_chunk_bytes(tune.link_chunk_mb)
        cache = ExpertCache(store, plan.slots, policy, dev, make_copy_engine(dev, chunk_bytes=chunk))
        experts = OffloadedExperts(cache, backend)
        experts.cpu_lane = build_cpu_lane(cache, config.cpu_experts or ("auto" if dev.type == "cuda" else "off"))
    model = MoeModel.from_checkpoint(ckpt, dtype=dt, device=dev, max_seq_len=max_seq_len, experts=experts,
                                     moe_backend=backend, show_progress=runtime.show_progress)
    if config.dense_dtype == "int8":
        _dense_int8(model, dev)
    if isinstance(experts, OffloadedExperts):
        _attach_prefetcher(model, experts, path, config, policy)
    loaded = OffloadedModel(path, model, runtime, tokenizer, plan, config)
    if config.speculative:
        loaded.speculative = build_speculative(model, path, config)
    # loading freed what it read on the way (an expert in float32 before quantization, dense weights before
    # int8): glibc keeps such blocks in the heap; hand them back (the int4 734M model: 555 -> 514 MB resident)
    release_freed_memory()
    return loaded


def gguf_bf16(ckpt: Any, dev: torch.device, dtype: Any, vnni: Any) -> bool:
    """Whether dtype 'auto' computes in bfloat16 (config.resolve_dtype): a GGUF file on the CPU when vnni()
    says the 8-bit activation kernels run here (load: the built kernels; info: the CPU's flags)."""
    return dtype == "auto" and dev.type == "cpu" and hasattr(ckpt, "expert_tensors") and bool(vnni())


def cpu_reports_vnni() -> bool:
    """Whether this CPU reports AVX512-VNNI (Linux /proc/cpuinfo; elsewhere False): what the built kernels'
    has_vnni() will say, without building them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:
        return False


def _dense_int8(model: MoeModel, dev: torch.device) -> None:
    """dense_dtype='int8': the attention projections and the LM head as int8 rows with fp16 scales (the
    int8 expert format's rule), read by the CPU decode kernels."""
    if dev.type != "cpu" or not cpu_gemv.available():
        why = f"device is {dev}" if dev.type != "cpu" else cpu_gemv.why_unavailable()
        raise MoeOffloadError(f"dense_dtype 'int8' runs on the CPU decode kernels ({why}); use dense_dtype 'auto'")
    if model.mla is not None:
        raise MoeOffloadError("dense_dtype 'int8' is not built for multi-head latent attention (DeepSeek); use "
                              "dense_dtype 'auto'")
    if model.lm_head is None:
        warnings.warn("moe-offload: dense_dtype int8: the LM head is tied to the embedding table and stays in "
                      "the compute dtype; the attention projections are int8", stacklevel=3)
    for w in model.dense_int8_weights():
        store_int8_rows(w, *quantize_int8(w.data))


def set_cpu_activations(mode: str) -> None:
    """The CPU kernels' activations mode (cpu_gemv.set_activations); 'int8' refused where VNNI is not built."""
    try:
        cpu_gemv.set_activations(mode)
    except RuntimeError as exc:
        raise MoeOffloadError(f"cpu_activations 'int8': {exc}; use 'auto' or 'exact'") from None


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads: `threads`, or (None) default_threads() unless OMP_NUM_THREADS is set."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def default_threads() -> int:
    """The physical cores this process may use: the machine's, capped by its CPU affinity (taskset,
    docker --cpuset-cpus) and its cgroup v2 CPU quota (docker --cpus), since threads beyond those share
    cores and OpenMP's barriers then stall."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = os.cpu_count() or cores
    if hasattr(os, "sched_getaffinity"):  # a share of the logical CPUs, in physical cores (rounded up)
        allowed = len(os.sched_getaffinity(0))
        cores = min(cores, max(1, -(-allowed * cores // logical)))
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The cgroup v2 CPU limit in whole CPUs (rounded up), or None without one ('max', no file)."""
    try:
        limit, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(1, -(-int(limit) // int(period)))


def _expert_storage(config: OffloadConfig, cfg: ModelConfig, path: Path) -> tuple[str, int]:
    """(expert_dtype, group_size): as asked, or as a quantized checkpoint stores them (which cannot change)."""
    expert_dtype, group_size = config.expert_dtype, config.group_size
    if cfg.expert_format is not None:  # a quantized checkpoint (`moe-offload quantize`, compressed-tensors)
        if expert_dtype not in ("auto", cfg.expert_format):
            raise MoeOffloadError(f"{path} holds {cfg.expert_format} experts (a quantized checkpoint); expert_dtype "
                                  f"{expert_dtype!r} cannot change that: use 'auto' or {cfg.expert_format!r}")
        if config.tuning.group_size is not None and config.tuning.group_size != cfg.expert_group_size:
            raise MoeOffloadError(f"{path} holds int4 experts in groups of {cfg.expert_group_size}; "
                                  f"tuning.group_size {config.tuning.group_size} cannot change that")
        return cfg.expert_format, cfg.expert_group_size
    if config.tuning.group_size is not None and expert_dtype not in INT4:
        raise MoeOffloadError(f"tuning.group_size={config.tuning.group_size} applies to int4 experts only; "
                              f"expert_dtype is {expert_dtype!r}")
    return expert_dtype, group_size


def _own_expert_format(cfg: ModelConfig, expert_dtype: str, dt: torch.dtype, backend: str, ckpt: Any = None) -> Any:
    """The expert format of a family whose experts carry biases and their own activation (GPT-OSS), run on
    the loop backend: float rows in the compute dtype with bias sections, or (a checkpoint shipping them
    packed: MXFP4) the file's packed rows with its biases (Checkpoint.expert_format); other storage
    refused in one line."""
    if backend != "loop":
        raise MoeOffloadError(f"{cfg.model_type} experts (with biases and the clamped SwiGLU) run on the loop backend; "
                              f"got moe_backend {backend!r}: pass moe_backend='loop' (--tuning moe_backend=loop)")
    if cfg.expert_format is not None and ckpt is not None and hasattr(ckpt, "expert_format"):  # packed as shipped
        fmt = ckpt.expert_format()
        return fmt.with_bias(fmt.bias_dtype, expert_activation(cfg)) if getattr(fmt, "bias", False) else fmt
    if expert_dtype not in ("auto", FloatFormat(dt).name):
        raise MoeOffloadError(f"{cfg.model_type} experts (with biases and the clamped SwiGLU) are kept in the compute "
                              f"dtype; expert_dtype {expert_dtype!r} (quantized or another dtype) is not supported for "
                              "them yet: use expert_dtype 'auto'")
    return FloatFormat(dt, bias=cfg.expert_bias, act=expert_activation(cfg))


def _attach_prefetcher(model: MoeModel, experts: OffloadedExperts, path: Path, config: OffloadConfig,
                       policy: Any) -> None:
    cfg = model.cfg
    lane_on = experts.cpu_lane is not None
    predictor = build_predictor(model, path, config, cpu_lane=lane_on, policy=policy.name)
    if predictor is None and lane_on and config.predictor == "auto":
        experts.prefetch_note = LANE_AUTO_OFF
    if predictor is None:
        return
    pf = Prefetcher(experts.cache, predictor, cfg.num_moe_layers, cfg.num_experts_per_tok,
                    margin=default_margin(config.tuning.prefetch_margin, predictor, lane_on),
                    rank_depth=default_rank_depth(predictor, policy, cfg.num_local_experts, cfg.num_experts_per_tok))
    predictor.first_layers(0, 0, pf.take)  # precompute the vocabulary's first-layer table now
    experts.prefetcher = pf
    model.observers.append(pf)


def build_speculative(model: MoeModel, path: Path, config: OffloadConfig):
    """The speculative decoder: the draft head from config.accelerator or the bundled file."""
    from .predict.draft import load_draft
    from .speculative import SpeculativeDecoder

    acc_file = config.accelerator
    if acc_file is None:
        if path.resolve() != bundled_model_path().resolve():
            raise MoeOffloadError("speculative=True needs accelerator=FILE with a draft head (train one with "
                                  "`moe-offload train-accelerator --draft-exit auto`)")
        acc_file = bundled_accelerator_path()
    head, _ = load_draft(acc_file, model)
    return SpeculativeDecoder(model, head, config.tuning.draft_tokens or DEFAULT_DRAFT_TOKENS)


def default_rank_depth(predictor: Any, policy: Any, num_experts: int, top_k: int) -> int | None:
    """Experts ranked per predicted layer: min(E, 4 top_k) when cross-token predictions meet the
    predictive policy (their plans then rank the next token's experts for eviction: 1.08x -> 1.22x in
    lab/README.md's rank-depth ablation at 8 experts, top-2), else the prefetched ones only (deeper
    ranks cost 0.96x -> 0.95x with within-token plans). The cap bounds host work: a plan of 16 rows
    costs ~90 us per layer at depth 8, ~340 us at 32, ~1.5 ms at 128 (128 experts, 48 layers, 2-core CPU)."""
    from .offload.policy import Predictive

    if predictor.cross_token and isinstance(policy, Predictive):
        return min(num_experts, 4 * top_k)
    return None


# With the CPU lane on (benchmarks/hybrid_prefetch.py; 6-8 Mixtral-8x7B projections: RTX 4090 / 3060,
# DDR5 / DDR4 host, int4 / bf16): under lru-layer, prefetch from within-token predictions loses against no
# prefetch (geometric mean 0.90x, benchmarks/results/hybrid_prefetch.json), while under lru it still gains
# (1.03x, hybrid_prefetch_lru.json); cross-token plans gain under both, best at margin 3 (1.06x and 1.12x;
# 1.27-1.29x on the RTX 4090 int4 4-of-8 lru-layer row).
LANE_CROSS_MARGIN = 3
LANE_AUTO_OFF_POLICIES = ("lru-layer",)
LANE_AUTO_OFF = ("auto: off with the CPU lane, lru-layer and within-token predictions "
                 "(benchmarks/results/hybrid_prefetch.json)")


def default_margin(asked: int | None, predictor: Any, cpu_lane: bool) -> int:
    """prefetch_margin as asked; unasked, LANE_CROSS_MARGIN for cross-token predictions with the CPU
    lane on, else 0."""
    if asked is not None:
        return asked
    return LANE_CROSS_MARGIN if cpu_lane and predictor.cross_token else 0


def build_predictor(model: MoeModel, path: Path, config: OffloadConfig, cpu_lane: bool = False,
                    policy: str = "lru"):
    """The predictor the config asks for (None for 'none'; also for 'auto' with the CPU lane on, a policy
    in LANE_AUTO_OFF_POLICIES and predictions that stay within the token, which do not pay there)."""
    from .predict import Accelerator, M2R2Predictor, NextGate, m2r2_lookahead

    name = config.predictor
    asked_lookahead = config.tuning.lookahead
    lookahead = 2 if asked_lookahead is None else asked_lookahead
    acc_file = config.accelerator
    chose_adapters = name == "m2r2" or acc_file is not None  # auto with the bundled file is not a choice
    auto = name == "auto"
    if auto:
        if acc_file is None and path.resolve() == bundled_model_path().resolve() and bundled_accelerator_path().is_file():
            acc_file = bundled_accelerator_path()
        name = "m2r2" if acc_file is not None else "next-gate"
    tuned = config.tuning.lookahead is not None or config.tuning.prefetch_margin is not None
    auto_off = auto and cpu_lane and policy in LANE_AUTO_OFF_POLICIES and not tuned  # prefetch options given: kept
    if name == "none" or (auto_off and name == "next-gate"):
        return None
    if name == "next-gate":
        L = model.cfg.num_moe_layers
        if asked_lookahead is not None and asked_lookahead >= L:
            raise MoeOffloadError(f"tuning.lookahead must be in [1, {L - 1}] for next-gate on this {L}-layer model "
                                  f"(it predicts later layers of the same token), got {asked_lookahead}")
        return NextGate(model, max(1, min(lookahead, L - 1)))
    if acc_file is None:
        if path.resolve() != bundled_model_path().resolve():
            raise MoeOffloadError("predictor 'm2r2' needs accelerator=FILE (train one with "
                                  "`moe-offload train-accelerator`)")
        acc_file = bundled_accelerator_path()
    acc, _ = Accelerator.load(acc_file, model)
    if auto_off and not acc.cross_token and config.accelerator is None:  # a file given is kept
        return None
    return M2R2Predictor(model, acc, m2r2_lookahead(acc, asked_lookahead, lookahead, acc_file, chose_adapters))
