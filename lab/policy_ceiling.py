"""Ceiling of prefetching under one eviction policy: the deep oracle (perfect knowledge of the next D
layers, across token boundaries) with that policy, swept over lookahead D and prefetch window W, beside
the trace's m2r2 and no prefetch. Answers "can any predictor reach speedup S with share H of its hits on
time under this policy?" for a trace (e.g. lru-layer, 1.25x with 0.90 of hits on time at 4 of 8 slots, int4).

    python benchmarks/policy_ceiling.py --trace T.npz [--trace T2.npz] [--policy lru-layer] \
        [--hardware rtx4090-pcie4] [--expert-dtype int4] [--capacity 128] [--max-tokens 4096] [--out ...json]
"""

from __future__ import annotations

import argparse

from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.sim import get_cpu, get_hardware
from moe_offload.analysis.trace import load_trace, trace_prefix
from moe_offload.results import result_metadata, write_json_atomic

from _paths import shown

CHUNK = 8 << 20


def row(name: str, base: float, p, lookahead: int, window: int) -> dict:
    s = p.settings
    return {"trace": name, "predictor": s["predictor"], "lookahead": lookahead, "window": window,
            "tokens_per_second": p.tokens_per_second, "speedup": p.tokens_per_second / base,
            "hit_rate": s["hit_rate"], "on_time_share_of_hits": s["on_time_share_of_hits"],
            "cpu_experts_per_token": s["cpu_experts_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", required=True, help="a trace from `moe-offload trace` (repeatable)")
    ap.add_argument("--policy", default="lru-layer")
    ap.add_argument("--hardware", default="rtx4090-pcie4")
    ap.add_argument("--model-config", default="mixtral-8x7b")
    ap.add_argument("--expert-dtype", default="int4")
    ap.add_argument("--capacity", type=int, default=128, help="slots of the real model (128 = 4 of 8 per layer)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--lookaheads", default="2,4,8,16,32", help="deep-oracle lookaheads, in the trace's layers")
    ap.add_argument("--windows", default="1,2,4")
    ap.add_argument("--m2r2-lookahead", type=int, default=3)
    ap.add_argument("--cpu", default="none", help="CPU lane profile (assets/cpu_profiles.json) or none")
    ap.add_argument("--out", default="benchmarks/results/policy_ceiling.json")
    args = ap.parse_args()
    cfg, hw = model_config(args.model_config), get_hardware(args.hardware)
    cpu = None if args.cpu == "none" else get_cpu(args.cpu)
    rows = []

    def sim(tr, pred, D, W):
        return simulate(tr, cfg, hw, args.expert_dtype, args.capacity, pred, args.policy, lookahead=D, window=W,
                        chunk_bytes=CHUNK, cpu=cpu, deep_oracle_bound=False)

    for path in args.trace:
        tr = trace_prefix(load_trace(path), args.max_tokens)
        base = sim(tr, "none", None, 1).tokens_per_second
        runs = [("none", None, 1)] + [("deep-oracle", D, W) for D in map(int, args.lookaheads.split(","))
                                      for W in map(int, args.windows.split(","))]
        if "m2r2" in (tr.preds or {}):
            runs.insert(1, ("m2r2", min(args.m2r2_lookahead, tr.preds["m2r2"].shape[2]), 1))
        for pred, D, W in runs:
            r = row(shown(path), base, sim(tr, pred, D, W), D, W)
            rows.append(r)
            print(f"{path}  {pred:11s} D={str(D):4s} W={W}  {r['tokens_per_second']:6.2f} tok/s  x{r['speedup']:.3f}  "
                  f"hit {r['hit_rate']:.3f}  on time {r['on_time_share_of_hits']:.3f} of hits", flush=True)
    best = max((r for r in rows if r["predictor"] == "deep-oracle"), key=lambda r: r["on_time_share_of_hits"])
    print(f"highest on-time share of any deep-oracle run: {best['on_time_share_of_hits']:.3f} "
          f"(x{best['speedup']:.3f}, {best['trace']}, D={best['lookahead']}, W={best['window']})")
    settings = {k: getattr(args, k) for k in ("trace", "policy", "hardware", "model_config", "expert_dtype",
                                              "capacity", "max_tokens", "lookaheads", "windows", "cpu")}
    settings["link_chunk_bytes"] = CHUNK
    print(f"wrote {write_json_atomic(args.out, {**result_metadata('cpu'), 'settings': settings, 'results': rows})}")


if __name__ == "__main__":
    main()
