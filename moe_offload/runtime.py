"""OffloadedModel and load(): the Python API."""

from __future__ import annotations

import numbers
import os

import itertools
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tokenizers import Tokenizer

from .checkpoint import Checkpoint
from .config import MixtralConfig, RuntimeConfig, resolve_device, resolve_dtype
from .errors import MoeOffloadError
from .guard import CallGuard
from .validate import boolean, integer
from .generate import (GenerationResult, GenerationStream, SamplingParams, TextStreamer, _Timing,
                       decode_tokens)
from .kernels import resolve_moe_backend
from .model.observers import UsageCounter
from .model.transformer import KVCache, MixtralTransformer
from .offload.packed import DEFAULT_GROUP_SIZE, PackedResidentExperts, resolve_expert_format
from .offload.cpu_lane import CPU_EXPERTS, build_cpu_lane
from .offload.link import DEFAULT_CHUNK_BYTES, link_chunk_bytes
from .offload import (CacheBudget, ExpertCache, HostExpertStore, MemoryPlan, OffloadedExperts, Prefetcher,
                      make_copy_engine, make_policy, plan_memory)

DEFAULT_MAX_SEQ_LEN = 4096
RUNTIME_OPTIONS = {
    "max_seq_len": "context length the KV cache is allocated for (default: min(max_position_embeddings, 4096))",
    "show_progress": "show a progress bar while loading weights (default False)",
    "moe_backend": "auto (triton on cuda, loop on cpu), triton, grouped_mm or loop",
    "offload": "True: experts in host RAM, a device slot cache; False: every expert on the device; "
               "default: True on cuda or when a cache budget is given, else False on cpu (there host RAM "
               "is the device: a cache and prefetch would only keep every expert twice and cost time)",
    "cache_experts": "expert slots on the device, over all layers",
    "cache_per_layer": "expert slots per layer (times the number of layers)",
    "cache_gb": "gigabytes of expert slots on the device",
    "policy": "eviction policy: lru (default), lru-layer, lfu or predictive",
    "predictor": "prefetch predictor: auto (m2r2 with the bundled/given accelerator, else next-gate; with the CPU "
                 "lane on and policy lru-layer, only cross-token m2r2 adapters: within-token prefetch loses there), none, "
                 "next-gate, m2r2, oracle (needs oracle_trace)",
    "lookahead": "layers ahead to predict and prefetch (default 2; with cross-token m2r2 adapters, the "
                 "largest lookahead they were trained for)",
    "accelerator": "M2R2 adapter file (.safetensors); default: the bundled one when it matches the model",
    "prefetch_margin": "prefetch top-(k + margin) experts per predicted layer (default 0; 3 for cross-token m2r2 "
                       "adapters with the CPU lane on)",
    "prefetch_window": "most prefetch copies in flight at once (default 1)",
    "rank_depth": "experts ranked per predicted layer (default top_k + prefetch_margin, the ones prefetched; "
                  "min(experts, 4 top_k) with cross-token m2r2 adapters and the predictive policy, measured best "
                  "in benchmarks/results/cross_token_ablation.md); deeper ranks are not loaded but give the "
                  "predictive policy an expected next use for more residents",
    "oracle_trace": "a RoutingTrace (or .npz from `moe-offload trace`) for predictor='oracle'",
    "expert_dtype": "expert storage: auto (the compute dtype), bf16 / fp16 (must equal dtype), int8 "
                    "(per-row scales) or int4 (groups of group_size); quantized on load, one expert at a time",
    "group_size": "int4 group size along the input dimension: 32, 64 or 128 (default 128)",
    "quant_kernels": "int8/int4 experts resident on cpu: auto (PyTorch's CPU weight-only ops where measured "
                     "faster, see kernels/quant_cpu.py) or reference (dequantize, then matmul)",
    "speculative": "self-speculative decoding: draft with the draft head of the accelerator file (or the "
                   "bundled one), resident experts only, verify in one pass (default False)",
    "draft_tokens": "most draft tokens per verify pass with speculative=True (default 4; adapts below it)",
    "link_chunk_mb": "the demand-first link on cuda (offload.cuda_link): prefetches queue on the host and reach the "
                     "copy stream in chunks of this many MiB, two at a time, so a demand copy waits behind at most two "
                     "chunks (default 8); 0: every copy goes onto the stream whole, in issue order (the FIFO engine)",
    "cpu_experts": "auto: a missed expert is computed on the CPU from host RAM when that beats its copy "
                   "(measured CPU and link speed); off: every miss is copied. Default: auto on cuda, off on cpu",
}


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

    def __init__(self, path: Path, model: MixtralTransformer, runtime: RuntimeConfig,
                 tokenizer: Tokenizer | None, memory_plan: MemoryPlan | None = None):
        self.path = path
        self.memory_plan = memory_plan
        self.expert_cache: ExpertCache | None = (model.experts.cache if isinstance(model.experts, OffloadedExperts)
                                                 else None)
        self.model = model
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.config: MixtralConfig = model.cfg
        self.kv_cache = KVCache(model.cfg, 1, runtime.max_seq_len, runtime.dtype, runtime.device)
        self.usage = UsageCounter(model.cfg.num_hidden_layers, model.cfg.num_local_experts, runtime.device)
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
            self.expert_cache.stats.reset()
            self._retries0 = getattr(self.expert_cache.engine, "retries", 0)
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
            "speculative": self.speculative is not None,
            **(self.speculative.stats_dict() if self.speculative is not None else {}),
            **(self.cache_stats() if self.expert_cache is not None else {}),
        }

    def cache_stats(self) -> dict[str, Any]:
        """Expert-cache counters since the last generate()/logits() call (totals and per_layer)."""
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
                "copy_retries": getattr(cache.engine, "retries", 0) - self._retries0}


def _refuse_stale(tokens: Iterator[int], is_stale: Callable[[], bool]) -> Iterator[int]:
    """A speculative stream cannot re-prefill itself after another call used the KV cache: it stops with
    a clear error rather than ever yielding a token computed on someone else's cache."""
    for tok in tokens:
        yield tok
        if is_stale():
            raise MoeOffloadError("a speculative stream cannot be resumed after another call on the same model "
                                  "used it; consume it first, or load a second model")


def load(path: str | Path | None = None, *, device: str | torch.device = "auto",
         dtype: str | torch.dtype = "auto", **runtime_options: Any) -> OffloadedModel:
    """Load a Hugging Face Mixtral folder (or the bundled model when path is None).

    device: "auto" (cuda if available, else cpu), "cpu" or "cuda[:N]". dtype: "auto" (float32 on cpu,
    the checkpoint's half type on cuda), "float32", "float16" or "bfloat16". runtime_options: see
    RUNTIME_OPTIONS. The checkpoint is validated completely before any weight is read.
    """
    unknown = sorted(set(runtime_options) - set(RUNTIME_OPTIONS))
    if unknown:
        raise MoeOffloadError(f"unknown runtime option(s) {unknown}; valid: {sorted(RUNTIME_OPTIONS)}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise MoeOffloadError(f"path must be a model folder (str or os.PathLike) or None, got {path!r}")
    for name in ("offload", "show_progress", "speculative"):
        if name in runtime_options:
            boolean(name, runtime_options[name], allow_none=name == "offload")
    for name, lo in (("max_seq_len", 1), ("lookahead", 1), ("prefetch_margin", 0), ("prefetch_window", 1),
                     ("rank_depth", 1), ("draft_tokens", 1), ("group_size", 1)):
        if runtime_options.get(name) is not None:
            runtime_options[name] = integer(name, runtime_options[name], lo)
    if "link_chunk_mb" in runtime_options:  # checked whether a cache is made or not
        link_chunk_bytes(runtime_options["link_chunk_mb"])
    if runtime_options.get("cpu_experts", "auto") not in CPU_EXPERTS:
        raise MoeOffloadError(f"cpu_experts {runtime_options['cpu_experts']!r} is not one of {list(CPU_EXPERTS)}")
    path = Path(path) if path is not None else bundled_model_path()
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, ckpt.dtype_name)
    max_seq_len = runtime_options.get("max_seq_len") or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if isinstance(max_seq_len, int) and max_seq_len > cfg.max_position_embeddings:
        raise MoeOffloadError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings})")
    try:
        backend = resolve_moe_backend(runtime_options.get("moe_backend", "auto"), dev, dt, cfg.hidden_size,
                                      cfg.intermediate_size)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    runtime = RuntimeConfig(device=dev, dtype=dt, max_seq_len=max_seq_len, moe_backend=backend,
                            show_progress=bool(runtime_options.get("show_progress", False)))
    ckpt.validate()  # every problem reported before a single weight is read
    tokenizer = _load_tokenizer(path)
    experts, plan = None, None
    offload = runtime_options.get("offload")
    policy = make_policy(runtime_options.get("policy", "lru"))  # validated whether used or not
    speculative = bool(runtime_options.get("speculative", False))
    cache_asked = [n for n in ("cache_experts", "cache_per_layer", "cache_gb", "accelerator", "oracle_trace")
                   if runtime_options.get(n) is not None and not (n == "accelerator" and speculative)]
    if runtime_options.get("predictor", "auto") not in ("auto", "none"):
        cache_asked.append("predictor")
    if offload is None:  # on cpu, host RAM is the device (RUNTIME_OPTIONS["offload"]), unless the cache is asked for
        offload = dev.type == "cuda" or bool(cache_asked)
    elif not offload and cache_asked:
        raise MoeOffloadError(f"{', '.join(cache_asked)} configure the expert cache, which offload=False "
                              "does not have; drop them or pass offload=True")
    group_size = runtime_options.get("group_size", DEFAULT_GROUP_SIZE)
    expert_dtype = runtime_options.get("expert_dtype", "auto")
    if cfg.expert_format is not None:  # a quantized checkpoint (`moe-offload quantize`, compressed-tensors)
        if expert_dtype not in ("auto", cfg.expert_format):
            raise MoeOffloadError(f"{path} holds {cfg.expert_format} experts (a quantized checkpoint); expert_dtype "
                                  f"{expert_dtype!r} cannot change that: use 'auto' or {cfg.expert_format!r}")
        if "group_size" in runtime_options and runtime_options["group_size"] != cfg.expert_group_size:
            raise MoeOffloadError(f"{path} holds int4 experts in groups of {cfg.expert_group_size}; group_size "
                                  f"{runtime_options['group_size']} cannot change that")
        expert_dtype, group_size = cfg.expert_format, cfg.expert_group_size
    fmt = resolve_expert_format(expert_dtype, group_size, dt, backend)
    runtime = replace(runtime, expert_format=fmt)
    if fmt is not None and not offload:
        store = HostExpertStore.from_checkpoint(ckpt, dt, show_progress=runtime.show_progress, fmt=fmt,
                                                group_size=group_size)
        experts = PackedResidentExperts(store, dev, backend, runtime_options.get("quant_kernels", "auto"))
    if offload:
        budget = CacheBudget(runtime_options.get("cache_experts"), runtime_options.get("cache_per_layer"),
                             runtime_options.get("cache_gb"))
        plan = plan_memory(cfg, dev, dt, max_seq_len, budget, policy.per_layer, fmt, group_size)
        store = HostExpertStore.from_checkpoint(ckpt, dt, pin=dev.type == "cuda", show_progress=runtime.show_progress,
                                                fmt=fmt, group_size=group_size)
        chunk = link_chunk_bytes(runtime_options.get("link_chunk_mb", DEFAULT_CHUNK_BYTES / (1 << 20)))
        cache = ExpertCache(store, plan.slots, policy, dev, make_copy_engine(dev, chunk_bytes=chunk))
        experts = OffloadedExperts(cache, backend)
        experts.cpu_lane = build_cpu_lane(cache,
                                          runtime_options.get("cpu_experts", "auto" if dev.type == "cuda" else "off"))
    model = MixtralTransformer.from_checkpoint(ckpt, dtype=dt, device=dev, max_seq_len=max_seq_len,
                                               experts=experts, moe_backend=backend,
                                               show_progress=runtime.show_progress)
    if isinstance(experts, OffloadedExperts):
        lane_on = experts.cpu_lane is not None
        predictor = build_predictor(model, path, runtime_options, cpu_lane=lane_on, policy=policy.name)
        if predictor is None and lane_on and runtime_options.get("predictor", "auto") == "auto":
            experts.prefetch_note = LANE_AUTO_OFF
        if predictor is not None:
            pf = Prefetcher(experts.cache, predictor, cfg.num_hidden_layers, cfg.num_experts_per_tok,
                            margin=default_margin(runtime_options.get("prefetch_margin"), predictor, lane_on),
                            max_inflight=runtime_options.get("prefetch_window") or 1,
                            rank_depth=default_rank_depth(runtime_options.get("rank_depth"), predictor, policy,
                                                          cfg.num_local_experts, cfg.num_experts_per_tok))
            predictor.first_layers(0, 0, pf.take)  # precompute the vocabulary's first-layer table now
            experts.prefetcher = pf
            model.observers.append(pf)
    loaded = OffloadedModel(path, model, runtime, tokenizer, plan)
    if speculative:
        loaded.speculative = build_speculative(model, path, runtime_options)
    elif runtime_options.get("draft_tokens") is not None:
        raise MoeOffloadError("draft_tokens needs speculative=True (--speculative)")
    return loaded


def build_speculative(model: MixtralTransformer, path: Path, options: dict[str, Any]):
    """The speculative decoder: the draft head from options['accelerator'] or the bundled file."""
    from .predict.draft import load_draft
    from .speculative import SpeculativeDecoder

    acc_file = options.get("accelerator")
    if acc_file is None:
        if path.resolve() != bundled_model_path().resolve():
            raise MoeOffloadError("speculative=True needs accelerator=FILE with a draft head (train one with "
                                  "`moe-offload train-accelerator --draft-exit auto`)")
        acc_file = bundled_accelerator_path()
    head, _ = load_draft(acc_file, model)
    draft_tokens = options.get("draft_tokens")
    return SpeculativeDecoder(model, head, 4 if draft_tokens is None else draft_tokens)


def default_rank_depth(asked: int | None, predictor: Any, policy: Any, num_experts: int, top_k: int) -> int | None:
    """rank_depth as asked; unasked, min(E, 4 top_k) when cross-token predictions meet the predictive
    policy (their plans then rank the next token's experts for eviction: 1.08x -> 1.22x in the ablation
    at 8 experts, top-2), else the prefetched ones only (deeper ranks cost 0.96x -> 0.95x with
    within-token plans). The cap bounds host work: a plan of 16 rows costs ~90 us per layer at depth 8,
    ~340 us at 32, ~1.5 ms at 128 (128 experts, 48 layers, this 2-core CPU)."""
    from .offload.policy import Predictive

    if asked is not None:
        return asked
    if getattr(predictor, "cross_token", False) and isinstance(policy, Predictive):
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
    return LANE_CROSS_MARGIN if cpu_lane and getattr(predictor, "cross_token", False) else 0


def build_predictor(model: MixtralTransformer, path: Path, options: dict[str, Any], cpu_lane: bool = False,
                    policy: str = "lru"):
    """The predictor the options ask for (None for 'none'; also for 'auto' with the CPU lane on, a policy
    in LANE_AUTO_OFF_POLICIES and predictions that stay within the token, which do not pay there)."""
    from .predict import Accelerator, M2R2Predictor, NextGate, OraclePredictor, m2r2_lookahead

    name = options.get("predictor", "auto")
    asked_lookahead = options.get("lookahead")
    lookahead = 2 if asked_lookahead is None else asked_lookahead
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise MoeOffloadError(f"lookahead must be an integer >= 1, got {lookahead!r}")
    margin = options.get("prefetch_margin")
    if margin is not None and (not isinstance(margin, int) or isinstance(margin, bool) or margin < 0):
        raise MoeOffloadError(f"prefetch_margin must be an integer >= 0, got {margin!r}")
    window = options.get("prefetch_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise MoeOffloadError(f"prefetch_window must be an integer >= 1, got {window!r}")
    valid = ("auto", "none", "next-gate", "m2r2", "oracle")
    if name not in valid:
        raise MoeOffloadError(f"predictor {name!r} is not one of {list(valid)}")
    acc_file = options.get("accelerator")
    chose_adapters = name == "m2r2" or acc_file is not None  # auto with the bundled file is not a choice
    auto = name == "auto"
    if auto:
        if acc_file is None and path.resolve() == bundled_model_path().resolve() and bundled_accelerator_path().is_file():
            acc_file = bundled_accelerator_path()
        name = "m2r2" if acc_file is not None else "next-gate"
    tuned = [k for k in ("lookahead", "prefetch_margin", "prefetch_window", "rank_depth") if options.get(k) is not None]
    auto_off = auto and cpu_lane and policy in LANE_AUTO_OFF_POLICIES and not tuned  # prefetch options given: kept
    if name == "none" or (auto_off and name == "next-gate"):
        return None
    if name == "next-gate":
        return NextGate(model, lookahead)
    if name == "oracle":
        trace = options.get("oracle_trace")
        if trace is None:
            raise MoeOffloadError("predictor 'oracle' needs oracle_trace (a routing trace of the text being run)")
        if isinstance(trace, (str, Path)):
            from .analysis.trace import load_trace

            trace = load_trace(trace)
        return OraclePredictor(trace.routed_ids, trace.routed_weights, model.cfg.num_local_experts, lookahead)
    if acc_file is None:
        if path.resolve() != bundled_model_path().resolve():
            raise MoeOffloadError("predictor 'm2r2' needs accelerator=FILE (train one with "
                                  "`moe-offload train-accelerator`)")
        acc_file = bundled_accelerator_path()
    acc, _ = Accelerator.load(acc_file, model)
    if auto_off and not acc.cross_token and options.get("accelerator") is None:  # a file given is kept
        return None
    return M2R2Predictor(model, acc, m2r2_lookahead(acc, asked_lookahead, lookahead, acc_file, chose_adapters))


def _load_tokenizer(path: Path) -> Tokenizer | None:
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise MoeOffloadError(f"{f}: not a valid tokenizer.json: {exc}") from None
