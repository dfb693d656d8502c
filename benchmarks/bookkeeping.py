#!/usr/bin/env python
"""Host bookkeeping per MoE layer on a synthetic routing trace, two ways:

- `host` (the headline number): the step planner OffloadedExperts runs per MoE layer in decode
  (offload.planner.StepPlanner.run: np.unique of the routed ids, `cache.acquire`, the prefetcher's
  `issue` (plan, cancel, pump prefetches), `cache.release`), with no compute, on the real ExpertCache,
  policy and Prefetcher, with an instant copy engine (every load lands at once, so the cache evicts
  and prefetches at full rate).
  The predictions' device side (scores, top-k) is not host work and is not timed.
- `timeline`: the whole `run_timeline` replay, which adds the simulator's virtual link and clock
  (an upper bound; simulation overhead, not runtime overhead).

Shapes: 8 experts top-2 x 32 layers (Mixtral), 64 top-8 x 16 (OLMoE), 128 top-8 x 48 (Qwen3-30B-A3B);
40% of experts resident (slots per layer = 0.4 E), policy lru-layer; prediction off, or an oracle-like
recorded predictor 2 layers ahead. Routing: per layer a Zipf popularity over experts; each token keeps
the previous token's set with probability 0.5, else draws top-k from the popularity (seeded).

    python benchmarks/bookkeeping.py [--tokens 64] [--mode host|timeline|both] [--out JSON]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from moe_offload.analysis.sim import RecordedPredictor, StepCosts, VirtualStore, run_timeline
from moe_offload.offload import ExpertCache, Prefetcher, make_policy
from moe_offload.offload.planner import StepPlanner
from moe_offload.results import result_metadata, write_json_atomic

SHAPES = [(8, 2, 32), (64, 8, 16), (128, 8, 48)]
# --shapes many: DeepSeek-V3's 256 experts top-8 over its 58 MoE layers, Kimi-K2's 384 top-8 over 60
MANY_SHAPES = [(256, 8, 58), (384, 8, 60)]


def routing(T: int, L: int, E: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros((T, L, k), dtype=np.int64)
    pop = [rng.permutation(E) for _ in range(L)]
    w = 1.0 / np.arange(1, E + 1) ** 0.8
    w /= w.sum()
    for t in range(T):
        for l in range(L):
            if t and rng.random() < 0.5:
                ids[t, l] = ids[t - 1, l]
            else:
                ids[t, l] = pop[l][rng.choice(E, size=k, replace=False, p=w)]
    return ids


def oracle(ids: np.ndarray, E: int, D: int = 2) -> RecordedPredictor:
    T, L, k = ids.shape
    truth = np.zeros((T, L, E), dtype=np.float32)
    np.put_along_axis(truth, ids, 1.0, axis=2)
    preds = np.full((T, L, D, E), np.nan, dtype=np.float32)
    for d in range(1, D + 1):
        preds[:, : L - d, d - 1] = truth[:, d:]
    return RecordedPredictor("oracle", preds, truth[:, :D].copy())


class _Landed:
    """A load handle that is done at once."""

    prefetch = False
    error = None

    def __init__(self, key, slot):
        self.key, self.slot = key, slot

    def done(self) -> bool:
        return True


class NoCompute:
    """planner.StepLanes that compute nothing: the host bookkeeping alone."""

    def device(self, layer, group, on_cpu, part) -> None:
        pass

    def cpu(self, layer, on_cpu) -> None:
        pass


class InstantEngine:
    """protocols.CopyEngine where every copy has landed when load() returns: no link, no waiting."""

    def load(self, key, src, dst, slot, prefetch=False, priority=0.0):
        return _Landed(key, slot)

    def wait(self, handle) -> float:
        return 0.0

    def fence(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


def host_us_per_layer(ids: np.ndarray, E: int, slots: int, policy: str, D: int | None, repeats: int = 3) -> tuple[float, float]:
    """Best-of-repeats host microseconds per MoE layer (and the hit rate) of the runtime's per-layer calls."""
    T, L, k = ids.shape
    best, hit = float("inf"), 0.0
    for _ in range(repeats):
        cache = ExpertCache(VirtualStore(L, E, 1 << 20), slots, make_policy(policy), torch.device("cpu"), InstantEngine())
        pf = None
        if D is not None:
            rec = oracle(ids, E, D)
            pf = Prefetcher(cache, rec, L, k, max_inflight=4)
            plans = [[np.concatenate([ids[t, l + d] for d in range(1, D + 1) if l + d < L] or [np.zeros(0, np.int64)])
                      for l in range(L)] for t in range(T)]  # [T][L] host ids, nearest layer first
        planner, lanes = StepPlanner(cache, pf), NoCompute()
        t0 = time.perf_counter()
        for t in range(T):
            if pf is not None:
                pf.on_step(None, t, [0])
            for l in range(L):
                planner.run(l, ids[t, l][None], plans[t][l] if pf is not None and plans[t][l].size else None, lanes)
        best = min(best, (time.perf_counter() - t0) / (T * L) * 1e6)
        hit = cache.stats.to_dict()["hit_rate"]
    return best, hit


def measure(ids: np.ndarray, E: int, k: int, L: int, slots: int, policy: str, pred: str, mode: str,
            costs: StepCosts) -> dict:
    row = {"experts": E, "top_k": k, "layers": L, "slots_per_layer": slots // L, "predictor": pred, "policy": policy}
    if mode in ("host", "both"):
        us, hit = host_us_per_layer(ids, E, slots, policy, 2 if pred == "oracle" else None)
        row.update(host_us_per_layer=us, host_hit_rate=hit)
    if mode in ("timeline", "both"):
        p = oracle(ids, E) if pred == "oracle" else None
        t0 = time.perf_counter()
        res = run_timeline(ids, E, slots, policy, costs, p, window=4)
        row.update(timeline_us_per_layer=(time.perf_counter() - t0) / (ids.shape[0] * L) * 1e6,
                   timeline_hit_rate=res.stats["hit_rate"])
    print(f"{policy:10s} E={E:4d} top-{k} L={L:2d} predictor {pred:6s}: "
          + ", ".join(f"{m} {row[m + '_us_per_layer']:7.1f} us per layer (hit rate {row[m + '_hit_rate']:.3f})"
                      for m in ("host", "timeline") if m + "_us_per_layer" in row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--mode", choices=["host", "timeline", "both"], default="both")
    ap.add_argument("--policy", default="lru-layer", help="a policy, or a comma list (default lru-layer)")
    ap.add_argument("--shapes", choices=["default", "many", "all"], default="default",
                    help="default: 8/64/128 experts; many: 256 and 384 experts top-8 (DeepSeek-V3, Kimi-K2)")
    ap.add_argument("--out", default="benchmarks/results/bookkeeping.json")
    args = ap.parse_args()
    shapes = {"default": SHAPES, "many": MANY_SHAPES, "all": SHAPES + MANY_SHAPES}[args.shapes]
    costs = StepCosts(attention=1e-4, expert=1e-4, bookkeeping=0.0, head=1e-4, copy=1e-3, expert_bytes=1 << 20)
    rows = []
    for policy in args.policy.split(","):
        for E, k, L in shapes:
            ids = routing(args.tokens, L, E, k)
            slots = max(k, int(0.4 * E)) * L
            for pred in ("none", "oracle"):
                rows.append(measure(ids, E, k, L, slots, policy, pred, args.mode, costs))
    print("saved", write_json_atomic(args.out, {**result_metadata("cpu"), "tokens": args.tokens, "mode": args.mode,
                                                "shapes": args.shapes, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
