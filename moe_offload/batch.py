"""Continuous batching: several sequences decode in one forward step, each in its own KV-cache row.

A `BatchScheduler` owns a KVCache of `max_batch` rows. Between steps, waiting requests join (each
prefilled alone into the next free row) and finished or cancelled ones leave (the last row's keys
and values move into the freed row, so the active rows are always 0..n-1). A step runs every active
row's one new token through the model at once (`RowPositions`: each row at its own position), so each
MoE layer routes N = n tokens and the offloaded backend loads the union of their experts once.
Multi-head latent attention (DeepSeek) batches the same way: each row attends in latent space over its
own cached latents.

With one active row the step is exactly the solo decode step (same shapes, same kernels, prefetch
on): batch-1 behaviour and speed do not change. Greedy output of a request does not depend on what
else is in the batch (tests/test_batch.py checks it token for token).

The scheduler is not thread-safe except `submit` and `cancel`: one thread calls `step()`.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import MoeOffloadError
from .generate import SamplingParams, sample_next
from .model.transformer import KVCache, RowPositions



class BatchHost(Protocol):
    """What the scheduler needs of a loaded model (runtime.OffloadedModel is one)."""

    runtime: Any  # config.RuntimeConfig
    model: Any  # model.transformer.MoeModel
    config: Any  # config.ModelConfig
    expert_cache: Any  # offload.ExpertCache | None

    def cache_stats(self) -> dict[str, Any]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def _reset_stats(self) -> None: ...

    def _recover(self) -> None: ...

_ids = itertools.count()


@dataclass(eq=False)
class BatchRequest:
    """One sequence in the scheduler. `on_token(request, token_id)` is called from the stepping thread
    after each new token; `on_finish(request)` once, when it leaves (finish_reason set)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[["BatchRequest", int], None] | None = None
    on_finish: Callable[["BatchRequest"], None] | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "stop_id" | "length" | "context" | "cancelled"
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    pos: int = 0  # position of the next input token (= tokens in its KV row)
    generator: torch.Generator | None = None
    # Optional hooks (the server's): `sampler(request, logits [V] float32 host) -> token id` replaces
    # sample_next (penalties, logit_bias, min_tokens, logprobs); `on_prompt_logits(request, logits [P, V])`
    # is called once after prefill with every prompt position's logits (prompt logprobs, echo), also
    # when max_new_tokens is 0; tokens in `stop_ids` end the request like EOS (finish_reason "stop_id").
    sampler: Callable[["BatchRequest", torch.Tensor], int] | None = None
    on_prompt_logits: Callable[["BatchRequest", torch.Tensor], None] | None = None
    stop_ids: tuple[int, ...] = ()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class BatchScheduler:
    """Runs BatchRequests with continuous batching up to `max_batch` rows (see the module docstring)."""

    def __init__(self, om: BatchHost, max_batch: int = 8):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise MoeOffloadError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        rt = om.runtime
        self.om, self.model, self.max_batch = om, om.model, max_batch
        self.eos = om.config.eos_token_ids
        self.kv = KVCache(om.config, max_batch, rt.max_seq_len, rt.dtype, rt.device)
        self.active: list[BatchRequest] = []  # row i holds active[i]
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        self._lock = threading.Lock()
        dev = rt.device
        self._rows = torch.arange(max_batch, dtype=torch.long, device=dev)  # [max_batch]
        self._pos = torch.zeros(max_batch, dtype=torch.long, device=dev)  # [max_batch]
        self._inp = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # [max_batch, 1]
        self.steps = 0
        self.tokens_generated = 0

    # --- thread-safe entry points ---------------------------------------------------------------
    def submit(self, req: BatchRequest) -> BatchRequest:
        """Queue a request; it joins the batch at the next step with a free row."""
        if len(req.prompt_ids) > self.kv.max_seq_len:
            raise MoeOffloadError(f"prompt has {len(req.prompt_ids)} tokens but the context holds "
                                  f"{self.kv.max_seq_len} (max_seq_len)")
        if req.params.temperature > 0:
            seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
            req.generator = torch.Generator().manual_seed(seed)
        with self._lock:
            self.waiting.append(req)
        return req

    def cancel(self, req: BatchRequest) -> None:
        """Mark a request cancelled: it leaves (freeing its row) at the next step boundary."""
        req.cancelled = True

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def idle(self) -> bool:
        return not self.active and not self.waiting

    # --- stepping -------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting requests into free rows (prefill), then decode one token for every active row."""
        self._drop_cancelled()
        while len(self.active) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            self._prefill(req)
        self._drop_cancelled()
        if self.active:
            self._decode()

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle():
            self.step()

    def _prefill(self, req: BatchRequest) -> None:
        row = len(self.active)
        if req.params.max_new_tokens == 0 and req.on_prompt_logits is None:
            self._finish(req, "length")
            return
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.om.runtime.device)  # [1, P]
        with torch.inference_mode():
            out = self.model(ids, 0, self.kv.rows(row, row + 1))[0]  # [P, V]
            if req.on_prompt_logits is not None:
                req.on_prompt_logits(req, out.float().cpu())
            logits = out[-1].float().cpu()  # [V]
        if req.params.max_new_tokens == 0:
            self._finish(req, "length")
            return
        req.pos = len(req.prompt_ids)
        self.active.append(req)
        self._accept(req, self._sample(req, logits))

    @staticmethod
    def _sample(req: BatchRequest, logits: torch.Tensor) -> int:
        if req.sampler is not None:
            return req.sampler(req, logits)
        return sample_next(logits, req.params, req.generator)

    def _decode(self) -> None:
        n = len(self.active)
        toks = [r.tokens[-1] for r in self.active]
        with torch.inference_mode():
            if n == 1:  # exactly the solo decode step (prefetch predicts for N == 1)
                r = self.active[0]
                self._inp[0, 0] = toks[0]
                logits = self.model(self._inp[:1], r.pos, self.kv.rows(0, 1), host_ids=(toks[0],))
            else:
                pos = [r.pos for r in self.active]
                self._inp[:n, 0].copy_(torch.tensor(toks))
                self._pos[:n].copy_(torch.tensor(pos))
                at = RowPositions(self._pos[:n], self._rows[:n], max(pos) + 1)
                logits = self.model(self._inp[:n], at, self.kv.rows(0, n), host_ids=tuple(toks))
            logits = logits[:, -1].float().cpu()  # [n, V]: the step's one host sync
        self.steps += 1
        for r in self.active:
            r.pos += 1
        for i, r in enumerate(list(self.active)):
            self._accept(r, self._sample(r, logits[i]))

    def _accept(self, req: BatchRequest, tok: int) -> None:
        """Record a sampled token and apply the stop rules (those of generate.decode_tokens)."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.tokens.append(tok)
        self.tokens_generated += 1
        if req.on_token is not None:
            req.on_token(req, tok)
        if tok in self.eos:
            self._leave(req, "eos")
        elif tok in req.stop_ids:
            self._leave(req, "stop_id")
        elif len(req.tokens) >= req.params.max_new_tokens:
            self._leave(req, "length")
        elif req.pos >= self.kv.max_seq_len:
            self._leave(req, "context")

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.active if r.cancelled]:
            self._leave(r, "cancelled")

    def _leave(self, req: BatchRequest, reason: str) -> None:
        """Free req's row: the last active row's keys/values move into it (rows stay 0..n-1)."""
        row, last = self.active.index(req), len(self.active) - 1
        if row != last:
            self.kv.k[:, row].copy_(self.kv.k[:, last])
            if self.kv.v.untyped_storage().data_ptr() != self.kv.k.untyped_storage().data_ptr():
                self.kv.v[:, row].copy_(self.kv.v[:, last])  # (an MLA cache's v is a view of k: moved with it)
            self.active[row] = self.active[last]
        self.active.pop()
        self._finish(req, reason)

    def _finish(self, req: BatchRequest, reason: str) -> None:
        req.finish_reason = reason
        req.finished_at = time.perf_counter()
        if req.on_finish is not None:
            req.on_finish(req)


def generate_batch(om: BatchHost, prompts: list[list[int]], params: SamplingParams,
                   max_batch: int) -> list:
    """`OffloadedModel.generate([...])`: every prompt through one scheduler; results in prompt order.
    Each result's stats are those of the whole batch (expert-cache counters are shared)."""
    from .generate import GenerationResult

    sched = BatchScheduler(om, max_batch)
    om._reset_stats()
    t0 = time.perf_counter()
    reqs = [sched.submit(BatchRequest(p, params)) for p in prompts]
    sched.run()
    seconds = time.perf_counter() - t0
    total = sum(len(r.tokens) for r in reqs)
    stats = {"batch_seconds": seconds, "batch_tokens": total, "batch_steps": sched.steps,
             "batch_tokens_per_second": total / seconds if seconds > 0 else 0.0,
             "offload": om.expert_cache is not None,
             **(om.cache_stats() if om.expert_cache is not None else {})}
    return [GenerationResult(text=om.decode(r.tokens), token_ids=r.tokens, prompt_token_ids=r.prompt_ids,
                             finish_reason=r.finish_reason or "length", seconds=r.finished_at - r.submitted_at,
                             tokens_per_second=len(r.tokens) / max(r.finished_at - r.submitted_at, 1e-9),
                             stats=stats) for r in reqs]
