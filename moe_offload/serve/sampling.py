"""Per-request sampling for the server: vLLM's order of logits processing, then temperature / top_k /
top_p sampling, and the logprobs a client asked for.

Order (vLLM's): logit_bias is added; EOS and stop_token_ids are masked while fewer than min_tokens were
generated; repetition_penalty (prompt and output tokens: positive logits divided, negative multiplied);
frequency_penalty * count and presence_penalty * (count > 0) subtracted (output tokens only); then
greedy argmax (temperature 0) or temperature, top_k, top_p and a draw from the request's seeded generator.

Logprobs are those of the model's own distribution (log_softmax of the raw logits, before any of the
above), as vLLM returns them by default. With no processing asked for, the token chosen is exactly
`generate.sample_next`'s (the server equals `generate`, greedy or seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..generate import SamplingParams, check_finite_logits, sampling_probs

Entry = tuple[int, float, list[tuple[int, float]]]  # token id, its logprob, the top-k [(id, logprob)]


@dataclass
class ChoiceSampler:
    params: SamplingParams
    prompt_ids: list[int]
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    min_ids: tuple[int, ...] = ()  # masked before min_tokens (EOS and stop_token_ids)
    logprobs: int | None = None  # top-k to return with each generated token (None: no logprobs)
    prompt_logprobs: int | None = None  # top-k for each prompt token (echo)
    entries: list[Entry] = field(default_factory=list)
    prompt_entries: list[Entry | None] = field(default_factory=list)

    @property
    def processes(self) -> bool:
        return bool(self.top_k or self.repetition_penalty != 1.0 or self.frequency_penalty or
                    self.presence_penalty or self.logit_bias or self.min_tokens)

    def __call__(self, req: Any, logits: torch.Tensor) -> int:
        """logits [V] float32 (host) -> the next token id; records its logprobs when asked."""
        check_finite_logits(logits)
        x = self.process(logits, req.tokens) if self.processes else logits
        p = self.params
        if p.temperature == 0.0:
            tok = int(torch.argmax(x))
        else:
            if self.top_k and self.top_k < x.numel():
                kth = torch.topk(x, self.top_k).values[-1]
                x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
            tok = int(torch.multinomial(sampling_probs(x, p), 1, generator=req.generator))
        if self.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            self.entries.append((tok, float(lp[tok]), _top(lp, self.logprobs)))
        return tok

    def process(self, logits: torch.Tensor, output: list[int]) -> torch.Tensor:
        x = logits.clone()
        V = x.numel()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
            x[ids] += torch.tensor(list(self.logit_bias.values()), dtype=x.dtype)
        if len(output) < self.min_tokens and self.min_ids:
            x[list(self.min_ids)] = float("-inf")
        if self.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool)
            seen[torch.tensor(self.prompt_ids + output, dtype=torch.long)] = True
            r = self.repetition_penalty
            x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        if (self.frequency_penalty or self.presence_penalty) and output:
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V).to(x.dtype)
            x = x - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(x.dtype)
        return x

    def on_prompt_logits(self, req: Any, logits: torch.Tensor) -> None:
        """logits [P, V] of the prompt -> each prompt token's logprob under the positions before it."""
        k = self.prompt_logprobs or 0
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [P-1, V]
        ids = torch.tensor(self.prompt_ids[1:], dtype=torch.long)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist() if len(ids) else []
        if k:
            vals, idx = torch.topk(lp, k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in chosen]
        self.prompt_entries = [None] + [(t, c, top) for t, c, top in zip(self.prompt_ids[1:], chosen, tops)]


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, idx = torch.topk(lp, k)
    return list(zip(idx.tolist(), vals.tolist()))
