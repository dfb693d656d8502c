#!/usr/bin/env python
"""Host bookkeeping per MoE layer (issue 14 part 4): the expert cache, eviction policy and prefetch
planning driven by a synthetic routing trace through `run_timeline` (the real ExpertCache, policies and
Prefetcher on a virtual link, so no bytes move and only host work is timed; the virtual link's own
scheduling is included, so these are upper bounds for the cache's part).

Shapes: 8 experts top-2 x 32 layers (Mixtral), 64 top-8 x 16 (OLMoE), 128 top-8 x 48 (Qwen3-30B-A3B);
40% of experts resident (slots per layer = 0.4 E), policy lru-layer; prediction off, or an oracle-like
recorded predictor 2 layers ahead. Routing: per layer a Zipf popularity over experts; each token keeps
the previous token's set with probability 0.5, else draws top-k from the popularity (seeded).

    python benchmarks/bookkeeping.py [--tokens 64] [--out JSON]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from moe_offload.analysis.sim import RecordedPredictor, StepCosts, run_timeline
from moe_offload.results import result_metadata, write_json_atomic

SHAPES = [(8, 2, 32), (64, 8, 16), (128, 8, 48)]


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/bookkeeping.json")
    args = ap.parse_args()
    costs = StepCosts(attention=1e-4, expert=1e-4, bookkeeping=0.0, head=1e-4, copy=1e-3, expert_bytes=1 << 20)
    rows = []
    for E, k, L in SHAPES:
        ids = routing(args.tokens, L, E, k)
        slots = max(k, int(0.4 * E)) * L
        for pred in ("none", "oracle"):
            p = oracle(ids, E) if pred == "oracle" else None
            t0 = time.perf_counter()
            res = run_timeline(ids, E, slots, "lru-layer", costs, p, window=4)
            us = (time.perf_counter() - t0) / (args.tokens * L) * 1e6
            rows.append({"experts": E, "top_k": k, "layers": L, "slots_per_layer": slots // L, "predictor": pred,
                         "host_us_per_layer": us, "hit_rate": res.stats["hit_rate"]})
            print(f"E={E:4d} top-{k} L={L:2d} predictor {pred:6s}: {us:7.1f} us per layer "
                  f"(hit rate {res.stats['hit_rate']:.3f})", flush=True)
    print("saved", write_json_atomic(args.out, {**result_metadata("cpu"), "tokens": args.tokens, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
