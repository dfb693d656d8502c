"""Self-speculative decoding: exactness against plain greedy, no copies while drafting, sampling rule."""

import shutil

import torch

from moe_offload import runtime
from moe_offload.predict.draft import DraftHead, write_draft
from moe_offload.speculative import accept_sampling
from moe_offload.options import OffloadConfig

PROMPTS = ["In the beginning God", "And the LORD said unto Moses"]


def _adapter(tmp_path, model, exit_layer=3):
    f = tmp_path / "acc.safetensors"
    shutil.copy(runtime.bundled_accelerator_path(), f)
    write_draft(f, DraftHead(model.config.hidden_size, exit_layer, 8), model.model, {})  # untrained head
    return str(f)


def test_greedy_speculative_equals_plain_untrained_head(tmp_path):
    plain = runtime.load(device="cpu", offload=False)
    acc = _adapter(tmp_path, plain)
    want = [plain.generate(p, max_new_tokens=24).token_ids for p in PROMPTS]
    for kw in (dict(offload=False), dict(cache_per_layer=2), dict(cache_per_layer=4, policy="lfu")):
        for budget in (True, False):  # the verify budget may drop every draft of a pass: exact either way
            with runtime.load(config=OffloadConfig.make(device="cpu", speculative=True, accelerator=acc, **kw)) as s:
                s.speculative.budget = budget
                for p, w in zip(PROMPTS, want):
                    r = s.generate(p, max_new_tokens=24)
                    assert r.token_ids == w, (kw, budget)
                    assert r.stats["draft_tokens"] >= r.stats["accepted_tokens"]
                    assert r.stats["spec_steps"] > 0 or budget
    # the prefetch-adapter loader ignores the draft tensors
    with runtime.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(accelerator=acc)) as a:
        assert a.generate(PROMPTS[0], max_new_tokens=8).token_ids == want[0][:8]


def test_speculative_sampling_matches_target():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        a, nxt = accept_sampling([d], q, torch.cat([p, p]), g)
        counts[d if a == 1 else nxt] += 1
    # 4 standard errors of a proportion at n = 20000 is < 0.015
    assert (counts / n - p[0]).abs().max() < 0.015


def test_drafting_never_copies_and_the_bundled_head_is_exact_under_every_policy(monkeypatch):
    from moe_offload.offload.cache import ExpertCache
    from moe_offload.speculative import Drafter

    plain = runtime.load(device="cpu", offload=False)
    want = plain.generate(PROMPTS[1], max_new_tokens=20).token_ids
    drafting = [False]
    loads_while_drafting = []
    orig_logits, orig_start = Drafter.logits, ExpertCache._start_load

    def drafter_logits(self, *a, **kw):
        drafting[0] = True
        try:
            return orig_logits(self, *a, **kw)
        finally:
            drafting[0] = False

    def start_load(self, key, *a, **kw):
        if drafting[0]:
            loads_while_drafting.append(key)
        return orig_start(self, key, *a, **kw)

    monkeypatch.setattr(Drafter, "logits", drafter_logits)
    monkeypatch.setattr(ExpertCache, "_start_load", start_load)
    for policy in ("lru", "lru-layer", "lfu", "predictive"):
        with runtime.load(device="cpu", cache_per_layer=3, config=OffloadConfig.make(speculative=True, policy=policy)) as s:  # bundled head
            r = s.generate(PROMPTS[1], max_new_tokens=20)
            assert r.token_ids == want, policy
            assert r.stats["draft_tokens"] > 0
    assert loads_while_drafting == []


def test_rollback_leaves_the_kv_cache_equal_to_a_plain_run(monkeypatch):
    """After every verify pass, K/V at the positions fed so far match a plain run's (float32 rounding of a
    batched vs single-token projection), and every position a rejected draft wrote is zero again."""
    from moe_offload.speculative import SpeculativeDecoder

    plain = runtime.load(device="cpu", offload=False, dtype="float32")
    want = plain.generate(PROMPTS[0], max_new_tokens=24)
    checked = []
    orig_step = SpeculativeDecoder._step

    def step(self, cache, tok, pos, g, *a, **kw):
        out = orig_step(self, cache, tok, pos, g, *a, **kw)
        n = pos + len(out)  # positions 0..n-1 hold the prompt and every token fed so far
        for mine, ref in ((cache.k, plain.kv_cache.k), (cache.v, plain.kv_cache.v)):
            assert torch.allclose(mine[:, :, :, :n], ref[:, :, :, :n], rtol=1e-5, atol=1e-5)
            assert mine[:, :, :, n:].abs().max() == 0, f"rejected drafts left K/V behind after position {n}"
        checked.append(len(out) - 1 < g)  # a pass with a rejection
        return out

    monkeypatch.setattr(SpeculativeDecoder, "_step", step)
    with runtime.load(device="cpu", offload=False, dtype="float32", config=OffloadConfig.make(speculative=True, draft_tokens=4)) as s:
        got = s.generate(PROMPTS[0], max_new_tokens=24)
    assert got.token_ids == want.token_ids
    assert any(checked), "no pass rejected a draft: the test checked no rollback"


def test_greedy_speculative_is_exact_with_random_copy_delays():
    import random

    from moe_offload.offload.transfer import CopyFaults

    plain = runtime.load(device="cpu", offload=False)
    want = [plain.generate(p, max_new_tokens=20).token_ids for p in PROMPTS]
    rng = random.Random(0)
    for cap, policy in ((2, "lru"), (4, "lru-layer"), (6, "lfu")):
        with runtime.load(device="cpu", cache_per_layer=cap, config=OffloadConfig.make(speculative=True, policy=policy)) as s:
            s.expert_cache.engine.faults = CopyFaults(delay=lambda key: rng.uniform(0, 0.003))
            for p, w in zip(PROMPTS, want):
                r = s.generate(p, max_new_tokens=20)
                assert r.token_ids == w, (cap, policy)
                assert r.stats["misses"] > 0


def test_rollback_after_a_verify_pass_that_dropped_positions(monkeypatch):
    """Offloaded, with the verify budget: passes that carry fewer positions into later layers still leave
    K/V equal to a plain run's and zero past the emitted tokens, and the tokens are the plain ones."""
    from moe_offload.speculative import SpeculativeDecoder

    plain = runtime.load(device="cpu", offload=False, dtype="float32")
    want = plain.generate(PROMPTS[1], max_new_tokens=32)
    orig_step = SpeculativeDecoder._step

    def step(self, cache, tok, pos, g, *a, **kw):
        out = orig_step(self, cache, tok, pos, g, *a, **kw)
        n = pos + len(out)
        for mine, ref in ((cache.k, plain.kv_cache.k), (cache.v, plain.kv_cache.v)):
            assert torch.allclose(mine[:, :, :, :n], ref[:, :, :, :n], rtol=1e-5, atol=1e-5)
            assert mine[:, :, :, n:].abs().max() == 0
        return out

    monkeypatch.setattr(SpeculativeDecoder, "_step", step)
    with runtime.load(device="cpu", dtype="float32", cache_per_layer=6, config=OffloadConfig.make(speculative=True, draft_tokens=4)) as s:
        got = s.generate(PROMPTS[1], max_new_tokens=32)
        assert got.token_ids == want.token_ids
        assert got.stats["verify_positions_dropped"] > 0 and got.stats["spec_steps"] > 0


class _Cache:
    """What VerifyBudget reads of an ExpertCache: residency, running hit counts, capacity."""

    def __init__(self, resident, uses, misses, cap):
        import numpy as np

        from moe_offload.offload.stats import CacheStats

        self.slot_of = np.array([[0 if r else -1 for r in resident]])
        self.stats = CacheStats(1)
        self.stats.uses[0], self.stats.misses[0] = uses, misses
        self._cap = cap

    def capacity(self, layer):
        return self._cap


def test_verify_budget_keeps_positions_worth_their_misses():
    """Hand-made costs. c = top_k * (misses + 1) / (uses + 2): 2 * 99 / 200 = 0.99 misses per plain token.
    Acceptance 0.5 (no data yet): position 1 may cost <= 0.495 misses, position 2 <= 0.2475."""
    import numpy as np

    from moe_offload.speculative import SpecStats, VerifyBudget

    resident = [True, True, True, True, False, False, False, False]
    rule = VerifyBudget(_Cache(resident, 198, 98, cap=8), 2, SpecStats())
    assert rule(0, np.array([[0, 1], [1, 2], [3, 0]])) == 3  # every position hits: all kept
    assert rule(0, np.array([[0, 1], [1, 4], [3, 0]])) == 1  # position 1 misses expert 4: dropped, and after it
    assert rule(0, np.array([[4, 5], [4, 5], [0, 6]])) == 2  # position 1 reuses position 0's misses: free
    assert rule.dropped == 2 + 1
    assert VerifyBudget(_Cache(resident, 198, 98, cap=3), 2, SpecStats())(0, np.array([[0, 1], [2, 3]])) == 1  # 4 > 3 slots
    st = SpecStats()
    st.record(1, 1)
    st.record(1, 1)  # acceptance of position 0 measured at 1.0: a miss costing 1 <= 1.0 * 0.99? no
    assert VerifyBudget(_Cache(resident, 198, 98, cap=8), 2, st)(0, np.array([[0, 1], [0, 4]])) == 1
    rich = _Cache(resident, 18, 18, cap=8)  # c = 2 * 19 / 20 = 1.9: one miss at acceptance 1.0 is worth it
    assert VerifyBudget(rich, 2, st)(0, np.array([[0, 1], [0, 4]])) == 2
