"""Prefill/decode loop, sampling, streaming and stop rules."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from .errors import MoeOffloadError, NonFiniteError
from .validate import SEED_MAX, integer, real
from .model.transformer import KVCache, MoeModel


# Far below this, logits / temperature overflow float32 (NaN probabilities); no use needs less.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """Validated generation settings. temperature 0 is greedy; top_p 1 disables nucleus sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: store the checked (plain int / float) values
        put(self, "max_new_tokens", integer("max_new_tokens", self.max_new_tokens, 0))
        put(self, "temperature", real("temperature", self.temperature, 0.0))
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise MoeOffloadError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature!r}: "
                                  "smaller ones overflow the softmax")
        put(self, "top_p", real("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        if self.seed is not None:
            put(self, "seed", integer("seed", self.seed, 0, SEED_MAX))


@dataclass
class GenerationResult:
    """What `OffloadedModel.generate` returns. token_ids are the new tokens (EOS included if hit)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "context"
    seconds: float
    tokens_per_second: float  # new tokens / wall seconds of the whole call (prefill included)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_finite_logits(logits: torch.Tensor) -> None:
    """Stop generation on NaN/Inf logits (a broken checkpoint would otherwise emit token 0 forever).
    logits are already on the host here: the check costs no device sync."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise NonFiniteError(f"the model produced {bad} non-finite logits (NaN/Inf) out of {logits.numel()}: "
                             "a weight of the checkpoint is broken or the compute dtype overflows "
                             "(try dtype='float32')")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] float32 on the host -> one token id (argmax when temperature is 0)."""
    check_finite_logits(logits)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(sampling_probs(logits, params), 1, generator=generator))


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> the distribution sampled from (temperature > 0, top_p nucleus), [..., V]
    (unnormalised after the nucleus cut; torch.multinomial normalises)."""
    probs = torch.softmax(logits / params.temperature, dim=-1)  # [..., V]
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < params.top_p  # smallest prefix reaching top_p
        keep[..., 0] = True  # the most likely token always stays (a top_p below float32's range keeps only it)
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


@dataclass
class _Timing:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str = "length"


def decode_tokens(model: MoeModel, cache: KVCache, prompt: list[int], params: SamplingParams,
                  eos_ids: tuple[int, ...], timing: _Timing,
                  is_stale: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield new token ids: prefill the prompt, then one decode step per token until a stop rule.

    `is_stale()` (asked before each decode step) says another call wrote the KV cache since the last
    step: the tokens so far are then prefilled again before the step (a resumed stream stays exact).

    Each step moves its logits to the host to sample: the one host sync per token, by design (the next
    step's input depends on it).
    """
    dev = model.device
    gen = None
    if params.temperature > 0:  # a private generator: the caller's global RNG is never touched
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        gen = torch.Generator().manual_seed(seed)
    if params.max_new_tokens == 0:
        return
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], dtype=torch.long, device=dev)  # [1, P]
    with torch.inference_mode():
        logits = model(ids, 0, cache)[0, -1].float().cpu()  # [V]
    timing.prefill_tokens, timing.prefill_seconds = len(prompt), time.perf_counter() - t0
    step_in = torch.empty(1, 1, dtype=torch.long, device=dev)  # [1, 1], reused every step
    pos = len(prompt)
    seen = list(prompt)  # tokens in the KV cache (positions 0..pos-1)
    for i in range(params.max_new_tokens):
        tok = sample_next(logits, params, gen)
        yield tok
        if tok in eos_ids:
            timing.finish_reason = "eos"
            return
        if i + 1 == params.max_new_tokens:
            return
        if pos >= cache.max_seq_len:
            timing.finish_reason = "context"
            return
        t1 = time.perf_counter()
        if is_stale is not None and is_stale():
            with torch.inference_mode():
                model(torch.tensor([seen], dtype=torch.long, device=dev), 0, cache)  # re-prefill [1, pos]
        seen.append(tok)
        step_in.fill_(tok)
        with torch.inference_mode():
            logits = model(step_in, pos, cache, host_ids=(tok,))[0, -1].float().cpu()  # [V]
        timing.decode_tokens += 1
        timing.decode_seconds += time.perf_counter() - t1
        pos += 1


class TextStreamer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode(self.ids)
        if full.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        delta, self.text = full[len(self.text):], full
        return delta

    def finish(self) -> str:
        full = self._decode(self.ids)
        delta, self.text = full[len(self.text):], full
        return delta


class GenerationStream:
    """Iterator over text deltas as tokens are generated; `.result` holds the GenerationResult after."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        return next(self._chunks)
