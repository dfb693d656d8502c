"""Self-speculative decoding: draft with layers 0..m-1 and resident experts only, verify g+1 positions in
one pass of the full model through the offload engine, accept the longest matching prefix (greedy) or by
standard speculative sampling (temperature / top-p), roll the KV cache back past the first rejection.

Exactness: every emitted token is the full model's own (greedy: its argmax at that position; sampling: a
draw from its distribution, by the accept/resample rule). The draft only decides how many positions one
verification pass covers. Draft K/V entries (layers 0..m-1) sit at positions the verify pass rewrites.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MoeOffloadError
from .generate import SamplingParams, _Timing, check_finite_logits, sample_next, sampling_probs
from .kernels import run_experts
from .model.layers import rms_norm
from .model.transformer import KVCache, MoeModel
from .offload import OffloadedExperts
from .predict.draft import DraftHead, resident_route


@dataclass
class SpecStats:
    """Counters of one generate() call. accepted_per_position[j]: drafts at position j accepted;
    reached_per_position[j]: verify passes in which draft j was checked (all before it accepted)."""

    spec_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    draft_substitutions: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    reached_per_position: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        need = max(drafted, len(self.reached_per_position))
        for lst in (self.accepted_per_position, self.reached_per_position):
            lst.extend([0] * (need - len(lst)))
        self.spec_steps += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        for j in range(min(accepted + 1, drafted)):
            self.reached_per_position[j] += 1
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    def acceptance(self, j: int, prior: float = 0.0) -> float:
        """Measured acceptance rate of draft position j (`prior` before it was ever reached)."""
        reached = self.reached_per_position[j] if j < len(self.reached_per_position) else 0
        return self.accepted_per_position[j] / reached if reached else prior

    def to_dict(self) -> dict[str, Any]:
        rate = [self.acceptance(j) for j in range(len(self.reached_per_position))]
        return {"spec_steps": self.spec_steps, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens, "draft_substitutions": self.draft_substitutions,
                "acceptance_per_position": rate, "reached_per_position": list(self.reached_per_position),
                "tokens_per_verify": (self.accepted_tokens + self.spec_steps) / self.spec_steps
                if self.spec_steps else 0.0}


class Drafter:
    """Runs layers 0..m-1 for one token with the KV cache, then the draft head: -> draft logits [V].

    With an offloaded backend it uses only experts already resident (and not on the link): routing is
    restricted to them (best-scoring resident replaces a non-resident choice), no acquire, no copy, no
    cache statistics or policy updates. Model observers are not called (drafts are not model steps)."""

    def __init__(self, model: MoeModel, head: DraftHead):
        if head.hidden != model.cfg.hidden_size or not 1 <= head.exit_layer < model.cfg.num_hidden_layers:
            raise MoeOffloadError(f"draft head (hidden {head.hidden}, exit layer {head.exit_layer}) does not fit "
                                  f"this model (hidden {model.cfg.hidden_size}, {model.cfg.num_hidden_layers} layers)")
        self.model, self.head = model, head
        self.offloaded = model.experts if isinstance(model.experts, OffloadedExperts) else None
        self.substitutions = 0

    def logits(self, token: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """token [1, 1] at position pos -> draft logits [V] float32 (device)."""
        model, eps = self.model, self.model.cfg.rms_norm_eps
        x = F.embedding(token, model.embed_tokens)  # [1, 1, H]
        for i in range(self.head.exit_layer):
            layer = model.layers[i]
            x = x + model._attention(rms_norm(x, layer.input_layernorm, eps), i, pos, cache)
            h = rms_norm(x, layer.post_attention_layernorm, eps).reshape(-1, x.shape[-1])  # [1, H]
            y = self._experts(i, h)  # [1, H]
            if model.cfg.has_shared_expert:  # the resident shared expert runs for every token
                y = y + model.shared_expert(h, i)
            x = x + y.reshape(x.shape)
        return self.head.logits(model, x.reshape(-1, x.shape[-1]))[0]  # [V]

    def _experts(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        model = self.model
        logits = model.router_logits(layer, h)  # [1, E]
        k = model.cfg.num_experts_per_tok
        if self.offloaded is None:
            weights, ids = model.route(layer, logits)  # [1, k]
            return model.experts(layer, h, ids, weights)
        cache = self.offloaded.cache
        usable = (cache.slot_of[layer] >= 0)  # [E] host
        for (l, e) in cache.inflight:
            if l == layer:
                usable[e] = False  # its copy may still be on the link
        n = int(usable.sum())
        routed = model.route(layer, logits)[1]  # [1, k]: what the full model would use
        if n == 0:
            self.substitutions += k
            return torch.zeros_like(h)
        slot_row = np.where(usable, cache.slot_of[layer], -1).astype(np.int32)  # [E]
        dev = h.device
        weights, ids = resident_route(logits, min(k, n), torch.from_numpy(usable).to(dev))  # [1, k']
        host = torch.cat([routed.reshape(-1), ids.reshape(-1)]).cpu().numpy()  # the layer's one read
        self.substitutions += int((~usable[host[:k]]).sum())
        ids_host = host[k:].reshape(ids.shape)
        return run_experts(self.offloaded.backend, h, ids, weights, *cache.layer_views[layer],
                           torch.from_numpy(slot_row).to(dev), slot_row, ids_host)


class VerifyBudget:
    """The verify rule of an offloaded model: at each layer, keep the leading positions of the pass whose
    new misses are worth it, drop the rest (lossless: attention is causal, and a dropped position only
    means fewer drafts checked this pass).

    Position 0 (the last emitted token) is always kept. Position i >= 1 is useful only if drafts
    0..i-1 are all accepted: P_i = prod of the measured acceptance rates (0.5 before any data). Its
    cost at this layer is the experts it needs that are neither resident nor needed by the positions
    kept before it; a plain decode step would pay c = top_k x (the cache's running miss rate) per
    token here. Position i is kept while cost_i <= P_i * c and the kept positions' experts fit the
    layer's capacity at once (no evict-and-reload within the pass)."""

    def __init__(self, cache, top_k: int, stats: "SpecStats"):
        self.cache, self.top_k, self.stats = cache, top_k, stats
        self.dropped = 0  # positions dropped, summed over layers and passes

    def _acceptance(self, j: int) -> float:
        return self.stats.acceptance(j, prior=0.5)

    def __call__(self, layer: int, ids_host: np.ndarray) -> int:
        cache = self.cache
        uses, misses = int(cache.stats.uses.sum()), int(cache.stats.misses.sum())
        c = self.top_k * (misses + 1) / (uses + 2)  # expected misses of one plain token at a layer
        resident = cache.slot_of[layer] >= 0  # [E]
        cap = cache.capacity(layer)
        needed: set[int] = set()
        p = 1.0
        for i, row in enumerate(ids_host.tolist()):
            new = {e for e in row if e not in needed}
            if i > 0:
                p *= self._acceptance(i - 1)
                misses_i = sum(1 for e in new if not resident[e])
                if misses_i > p * c or len(needed) + len(new) > cap:
                    self.dropped += ids_host.shape[0] - i
                    return i
            needed |= new
        return ids_host.shape[0]


def _kept_positions(experts: OffloadedExperts):
    """The model's position_limit during a verify pass: after each layer, the positions the expert
    backend's verify rule kept at that layer (None: all)."""
    return lambda layer: experts.pop_kept_rows()


def rollback(cache: KVCache, keep: int, end: int) -> None:
    """Forget K/V at positions keep..end-1 (rejected drafts) in every layer: the cache then equals a
    plain run's, which never wrote there."""
    if end > keep:
        cache.k[:, :, :, keep:end].zero_()
        cache.v[:, :, :, keep:end].zero_()


def accept_greedy(drafts: list[int], target: torch.Tensor) -> tuple[int, int]:
    """drafts [g], target logits [g+1, V] (host) -> (accepted count a, the full model's token after them)."""
    best = torch.argmax(target, dim=-1).tolist()  # [g+1]
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return a, best[a]


def accept_sampling(drafts: list[int], q: torch.Tensor, p: torch.Tensor, gen: torch.Generator | None
                    ) -> tuple[int, int]:
    """Standard speculative sampling. drafts [g] drawn from q [g, V]; p [g+1, V] the target distributions
    (each row normalised). Accept draft j with probability min(1, p_j(d)/q_j(d)); at the first rejection
    draw from norm(max(p_j - q_j, 0)); if all are accepted draw a bonus token from p_g. Every emitted token
    is then distributed exactly as the target's. Returns (accepted count, the next token)."""
    for j, d in enumerate(drafts):
        u = float(torch.rand((), generator=gen))
        if u * float(q[j, d]) < float(p[j, d]):
            continue
        residual = (p[j] - q[j]).clamp_min(0)  # [V]
        if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection, bar rounding
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))


def _normalised(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    probs = sampling_probs(logits.float(), params)
    return probs / probs.sum(-1, keepdim=True)


class SpeculativeDecoder:
    """Holds the drafter and the draft-length rule; `tokens()` replaces the plain decode loop."""

    def __init__(self, model: MoeModel, head: DraftHead, max_draft: int = 4, adaptive: bool = True,
                 budget: bool = True):
        if not isinstance(max_draft, int) or isinstance(max_draft, bool) or max_draft < 1:
            raise MoeOffloadError(f"draft_tokens must be an integer >= 1, got {max_draft!r}")
        self.drafter = Drafter(model, head)
        self.model, self.max_draft, self.adaptive = model, max_draft, adaptive
        self.budget = budget  # offloaded: verify passes drop positions not worth their misses (VerifyBudget)
        self.stats = SpecStats()
        self._rule: VerifyBudget | None = None
        self._checked = 0  # drafts the last verify pass checked (fewer than drafted when the budget dropped some)

    def reset(self) -> None:
        self.stats = SpecStats()
        self.drafter.substitutions = 0
        self._rule = None

    def stats_dict(self) -> dict[str, Any]:
        self.stats.draft_substitutions = self.drafter.substitutions
        return {**self.stats.to_dict(), "draft_exit_layer": self.drafter.head.exit_layer,
                "max_draft_tokens": self.max_draft,
                "verify_positions_dropped": self._rule.dropped if self._rule is not None else 0}

    def _verify_rule(self) -> "VerifyBudget | None":
        experts = self.drafter.offloaded
        if not self.budget or experts is None:
            return None
        if self._rule is None or self._rule.stats is not self.stats:
            self._rule = VerifyBudget(experts.cache, self.model.cfg.num_experts_per_tok, self.stats)
        return self._rule

    def _next_length(self, g: int, accepted: int) -> int:
        if not self.adaptive:
            return self.max_draft
        return min(self.max_draft, g + 1) if accepted == g else max(1, accepted + 1)

    def tokens(self, cache: KVCache, prompt: list[int], params: SamplingParams, eos_ids: tuple[int, ...],
               timing: _Timing) -> Iterator[int]:
        """Yield new token ids like generate.decode_tokens (same stop rules), several per verify pass."""
        model, dev = self.model, self.model.device
        gen = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            gen = torch.Generator().manual_seed(seed)
        if params.max_new_tokens == 0:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt], dtype=torch.long, device=dev), 0, cache)[0, -1].float().cpu()
        timing.prefill_tokens, timing.prefill_seconds = len(prompt), time.perf_counter() - t0
        tok, pos, emitted, g = sample_next(logits, params, gen), len(prompt), 1, self.max_draft
        yield tok
        if tok in eos_ids:
            timing.finish_reason = "eos"
            return
        while emitted < params.max_new_tokens:
            if pos >= cache.max_seq_len:
                timing.finish_reason = "context"
                return
            t1 = time.perf_counter()
            g_now = max(0, min(g, params.max_new_tokens - emitted - 1, cache.max_seq_len - 1 - pos))
            with torch.inference_mode():
                out = self._step(cache, tok, pos, g_now, params, gen)
            timing.decode_tokens += len(out)
            timing.decode_seconds += time.perf_counter() - t1
            if g_now > 0:
                a, checked = len(out) - 1, self._checked
                # all the budget let through were accepted: draft one more than it let through next time
                g = self._next_length(g_now, a) if a < checked or checked == g_now else min(self.max_draft, checked + 1)
            for t in out:
                yield t
                emitted += 1
                if t in eos_ids:
                    timing.finish_reason = "eos"
                    return
            tok, pos = out[-1], pos + len(out)

    def _step(self, cache: KVCache, tok: int, pos: int, g: int, params: SamplingParams,
              gen: torch.Generator | None) -> list[int]:
        """Draft g tokens after `tok` (at pos), verify all in one pass, roll back; -> the new tokens."""
        model, dev = self.model, self.model.device
        drafts: list[int] = []
        q_rows = []
        cur = torch.empty(1, 1, dtype=torch.long, device=dev)
        cur.fill_(tok)
        for j in range(g):
            dl = self.drafter.logits(cur, pos + j, cache).cpu()  # [V]: one read per draft token
            if params.temperature == 0:
                d = int(torch.argmax(dl))
            else:
                q = _normalised(dl, params)
                q_rows.append(q)
                d = int(torch.multinomial(q, 1, generator=gen))
            drafts.append(d)
            cur.fill_(d)
        batch = [tok] + drafts
        ids = torch.tensor([batch], dtype=torch.long, device=dev)  # [1, g+1]
        experts = self.drafter.offloaded
        if experts is not None and g > 0:
            # the verify rule drops the trailing positions not worth their misses at each layer; the
            # model then carries only the kept ones into its later layers
            experts.verify_rule = self._verify_rule()
            model.position_limit = _kept_positions(experts)
        try:
            target = model(ids, pos, cache, host_ids=batch)[0].float().cpu()  # [g'+1, V], g' <= g kept
        finally:
            if experts is not None:
                experts.verify_rule = None
                model.position_limit = None
        check_finite_logits(target)
        end = pos + g + 1  # K/V were written up to here (dropped positions: in the layers before the drop)
        g = self._checked = target.shape[0] - 1
        drafts, q_rows = drafts[:g], q_rows[:g]
        if params.temperature == 0:
            a, nxt = accept_greedy(drafts, target)
        elif g == 0:
            a, nxt = 0, sample_next(target[0], params, gen)
        else:
            a, nxt = accept_sampling(drafts, torch.stack(q_rows), _normalised(target, params), gen)
        rollback(cache, pos + a + 1, end)
        if g > 0:
            self.stats.record(g, a)
        return drafts[:a] + [nxt]
