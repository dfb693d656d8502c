"""One per-layer step planner (offload.planner) for the runtime and the simulator: the simulator runs
the real planner, and both count the same hits, misses and CPU-lane experts on the same routing."""

import numpy as np
import pytest
import torch

from moe_offload.analysis.sim import RecordedPredictor, StepCosts, run_timeline
from moe_offload.kernels import moe_loop
from moe_offload.offload import (ExpertCache, HostExpertStore, OffloadedExperts, Prefetcher, ThreadCopyEngine,
                                 make_policy)
from moe_offload.offload.cpu_lane import CpuLane, LaneCosts
from moe_offload.offload.planner import StepPlanner

H, I = 8, 16
# The CPU takes a layer's first miss (0.6 < 1.0 of copy) and leaves the next ones to the link (1.2 > 1.0).
LANE = LaneCosts(copy_seconds=1.0, chunk_seconds=0.0, weight_seconds=0.6, token_seconds=0.0)
COUNTS = ("uses", "hits", "misses", "cpu_experts", "prefetch_hits", "prefetch_wasted")


def routing(T, L, E, k, seed=0):
    """[T, L, k] sticky, skewed routing (distinct ids per row)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E) * 0.5, size=L)
    ids = np.zeros((T, L, k), dtype=np.int64)
    for t in range(T):
        for l in range(L):
            ids[t, l] = ids[t - 1, l] if t and rng.random() < 0.3 else rng.choice(E, size=k, replace=False, p=p[l])
    return ids


def noisy_oracle(ids, E, D=2, seed=1):
    """Recorded scores [T, L, D, E]: the true next layers' experts plus noise (often wrong)."""
    T, L, _ = ids.shape
    truth = np.zeros((T, L, E), dtype=np.float32)
    np.put_along_axis(truth, ids, 1.0, axis=2)
    noisy = truth + np.random.default_rng(seed).uniform(0, 1.5, truth.shape).astype(np.float32)
    preds = np.full((T, L, D, E), np.nan, dtype=np.float32)
    for d in range(1, D + 1):
        preds[:, : L - d, d - 1] = noisy[:, d:]
    return RecordedPredictor("noisy-oracle", preds, noisy[:, :D].copy())


def test_run_timeline_runs_the_step_planner(monkeypatch):
    ids = routing(12, 3, 8, 2)
    calls = {"run": 0, "plan": 0}
    run, plan = StepPlanner.run, StepPlanner.plan

    def spy_run(self, *a, **kw):
        calls["run"] += 1
        return run(self, *a, **kw)

    def spy_plan(self, *a, **kw):
        calls["plan"] += 1
        return plan(self, *a, **kw)

    monkeypatch.setattr(StepPlanner, "run", spy_run)
    monkeypatch.setattr(StepPlanner, "plan", spy_plan)
    costs = StepCosts(attention=1.0, expert=1.0, bookkeeping=0.0, head=0.0, copy=0.5, expert_bytes=100)
    r = run_timeline(ids, 8, 6, "lru", costs, noisy_oracle(ids, 8), cpu=LANE)
    assert calls == {"run": 12 * 3, "plan": 12 * 3}
    assert r.stats["cpu_experts"] > 0

    # The simulator's decision is the planner's: a plan sending every expert to the CPU shows up whole.
    def all_on_cpu(self, layer, ids_host):
        return np.unique(ids_host).tolist(), [[]]

    monkeypatch.setattr(StepPlanner, "plan", all_on_cpu)
    r = run_timeline(ids, 8, 6, "lru", costs, cpu=LANE)
    assert r.stats["cpu_experts"] == r.stats["misses"] == r.stats["uses"] > 0 and r.stats["hits"] == 0
    assert r.cpu_wait_seconds > 0


def runtime_counts(ids, E, slots, policy, predictor, lane, window):
    """Drive the runtime's OffloadedExperts (loop kernels, the thread copy engine, the real CpuLane)
    over routing [T, L, k], one position per step; the link drained whenever loads were queued, so every
    copy has landed when the next layer plans (as on the simulator's instant link). -> (stats, max error)."""
    T, L, k = ids.shape
    g = torch.Generator().manual_seed(0)
    store = HostExpertStore(L, E, H, I, torch.float32)
    w13 = torch.randn(L, E, 2 * I, H, generator=g) * 0.3
    w2 = torch.randn(L, E, H, I, generator=g) * 0.3
    for l in range(L):
        for e in range(E):
            store.put(l, e, w13[l, e, :I], w13[l, e, I:], w2[l, e])
    cache = ExpertCache(store, slots, make_policy(policy), torch.device("cpu"), ThreadCopyEngine())
    experts = OffloadedExperts(cache, "loop")
    if lane is not None:
        experts.cpu_lane = CpuLane(store, lane)
    pf = experts.prefetcher = Prefetcher(cache, predictor, L, k, max_inflight=window) if predictor is not None else None
    err = 0.0
    try:
        with torch.inference_mode():
            for t in range(T):
                if pf is not None:
                    pf.on_step(None, t, [0])
                    cache.engine.drain()
                for l in range(L):
                    h = torch.randn(1, H, generator=g)  # [1, H]
                    weights = torch.softmax(torch.randn(1, k, generator=g), -1)  # [1, k]
                    ids_t = torch.from_numpy(ids[t, l][None].copy())  # [1, k]
                    if pf is not None:
                        pf.on_residual(l, h, t)
                    out = experts(l, h, ids_t, weights)
                    cache.engine.drain()
                    want = moe_loop(h, ids_t, weights, w13[l], w2[l])  # every expert resident
                    err = max(err, float((out - want).abs().max()))
        assert not cache.pinned
        cache.stats.check()
        return cache.stats.to_dict(), err
    finally:
        cache.close()


@pytest.mark.parametrize("policy,slots,k,predicted,lane", [
    ("lru", 5, 2, False, LANE),
    ("lru", 5, 2, True, LANE),
    ("lru-layer", 9, 2, True, LANE),
    ("lfu", 6, 2, True, None),
    ("lru-layer", 6, 5, False, LANE),  # five ids per step (a verify pass) in groups of two
])
def test_runtime_and_simulator_count_the_same(policy, slots, k, predicted, lane):
    T, L, E = 30, 3, 8
    ids = routing(T, L, E, k, seed=slots + k)
    pred = noisy_oracle(ids, E) if predicted else None
    window = 64  # every planned prefetch is issued at once: no count depends on when a copy lands
    got, err = runtime_counts(ids, E, slots, policy, pred, lane, window)
    assert err < 1e-5  # the runtime's layer output is exact (fp32 rounding of the summation order)
    instant = StepCosts(attention=1.0, expert=1.0, bookkeeping=0.0, head=0.0, copy=0.0, expert_bytes=1)
    sim = run_timeline(ids, E, slots, policy, instant, pred, window=window, cpu=lane).stats
    assert {c: sim[c] for c in COUNTS} == {c: got[c] for c in COUNTS}
    assert sim["bytes_h2d"] * (H * I * 3 * 4) == got["bytes_h2d"]  # one expert's bytes per copy
    if lane is not None and k == 2:
        assert got["cpu_experts"] > 0
    if predicted:
        assert got["prefetch_hits"] > 0
