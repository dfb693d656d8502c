"""Prefetch and CPU-lane projection table: Mixtral-8x7B decode tokens/s on the RTX 4090 and RTX 3060 profiles, bf16 and
int4 experts, lru-layer, with and without prefetch (m2r2) and the CPU lane, plus the deep-oracle ceiling
and the old whole-expert FIFO link for comparison. Replays a trace from `moe-offload trace` (with m2r2).
With --cross-trace (a trace recorded with cross-token adapters, `train-accelerator --cross-token`; the
per-row adapters of simulate_issue12_cross*.json: add --no-cross-heads --no-attention-peek), adds
rows "m2r2-cross": the predictive policy with its plans across the token boundary (lookahead
--cross-lookahead) and every expert of a predicted layer ranked (--rank-depth = experts per layer), and
rows "m2r2-cross-lru": the same plans under lru-layer with --cross-margin. Every row also gives its speedup
over no prefetch with the same CPU lane setting (speedup_vs_no_prefetch_same_lane).

    python benchmarks/simulate_issue12.py --trace T.npz [--cross-trace X.npz] [--max-tokens 1024] [--out ...json]
"""

from __future__ import annotations

import argparse

from moe_offload import MoeOffloadError
from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.sim import get_cpu, get_hardware
from moe_offload.analysis.trace import load_trace, trace_prefix
from moe_offload.results import result_metadata, write_json_atomic

from _paths import shown

CHUNK = 8 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--cpu", default="desktop-ddr5-2ch")
    ap.add_argument("--out", default="benchmarks/results/simulate_issue12.json")
    ap.add_argument("--cross-trace", default=None, help="a trace with cross-token m2r2 rows (adds m2r2-cross rows)")
    ap.add_argument("--cross-lookahead", type=int, default=12)
    ap.add_argument("--cross-window", type=int, default=1)
    ap.add_argument("--cross-margin", type=int, default=2,
                    help="prefetch margin of the m2r2-cross-lru rows (lru-layer, CPU lane on and off)")
    args = ap.parse_args()
    trace = trace_prefix(load_trace(args.trace), args.max_tokens)
    cross = trace_prefix(load_trace(args.cross_trace), args.max_tokens) if args.cross_trace else None
    cfg, cpu = model_config("mixtral-8x7b"), get_cpu(args.cpu)
    rows = []
    for hw_key in ("rtx4090-pcie4", "rtx3060-pcie3"):
        for dtype in ("bf16", "int4"):
            capacity = 128 if (hw_key, dtype) == ("rtx4090-pcie4", "int4") else None  # 4 of 8 per layer: the target row
            runs = [("none", None, CHUNK, 1), ("m2r2", None, CHUNK, 1), ("m2r2", None, None, 1),
                    ("none", cpu, CHUNK, 1), ("m2r2", cpu, CHUNK, 1)]
            if cross is not None:
                runs += [("m2r2-cross", None, CHUNK, args.cross_window), ("m2r2-cross", cpu, CHUNK, args.cross_window),
                         ("m2r2-cross-lru", None, CHUNK, 1), ("m2r2-cross-lru", cpu, CHUNK, 1)]
            for pred, lane, chunk, window in runs:
                if pred == "m2r2-cross-lru":  # the target's policy, plans across tokens, margin --cross-margin
                    p = None
                    for policy in ("lru-layer", "lru"):  # lru where fewer than top_k slots per layer fit
                        try:
                            p = simulate(cross, cfg, get_hardware(hw_key), dtype, capacity, "m2r2", policy,
                                         lookahead=args.cross_lookahead, window=1, margin=args.cross_margin,
                                         chunk_bytes=chunk, cpu=lane)
                            break
                        except MoeOffloadError:
                            continue
                elif pred == "m2r2-cross":  # predictive policy, plans across tokens, whole layers ranked
                    E = cross.router_probs.shape[2]
                    p = simulate(cross, cfg, get_hardware(hw_key), dtype, capacity, "m2r2", "predictive",
                                 lookahead=args.cross_lookahead, window=window, chunk_bytes=chunk, cpu=lane,
                                 rank_depth=E)
                else:
                    try:
                        p = simulate(trace, cfg, get_hardware(hw_key), dtype, capacity, pred, "lru-layer", lookahead=3,
                                     window=window, chunk_bytes=chunk, cpu=lane)
                    except MoeOffloadError:  # fewer than top_k slots per layer fit: lru-layer cannot run, use lru
                        p = simulate(trace, cfg, get_hardware(hw_key), dtype, capacity, pred, "lru", lookahead=3,
                                     window=window, chunk_bytes=chunk, cpu=lane)
                if p is None:
                    continue
                s = p.settings
                same = [r for r in rows if (r["hardware"], r["expert_dtype"], r["predictor"], r["cpu"]) ==
                        (hw_key, dtype, "none", s["cpu"])]  # no prefetch, same lane: the like-for-like baseline
                row = {"hardware": hw_key, "expert_dtype": dtype, "slots_per_layer": s["slots_per_layer"],
                       "policy": s["policy"], "lookahead": args.cross_lookahead if pred.startswith("m2r2-cross") else 3, "prefetch_window": window,
                       "rank_depth": E if pred == "m2r2-cross" else None,
                       "prefetch_margin": args.cross_margin if pred == "m2r2-cross-lru" else 0,
                       "speedup_vs_no_prefetch_same_lane": (p.tokens_per_second / same[0]["tokens_per_second"]
                                                            if same else 1.0),
                       "predictor": pred, "cpu": s["cpu"], "link": "chunked 8 MiB" if chunk else "whole-expert FIFO",
                       "tokens_per_second": p.tokens_per_second, "hit_rate": s["hit_rate"],
                       "on_time_hit_rate": s["on_time_hit_rate"], "on_time_share_of_hits": s["on_time_share_of_hits"],
                       "cpu_experts_per_token": s["cpu_experts_per_token"], **p.limits}
                rows.append(row)
                print(f"{hw_key:14s} {dtype:5s} {s['slots_per_layer']:4.1f}/layer {s['policy']:10s} {pred:14s} cpu={str(s['cpu']):17s} "
                      f"{row['link']:18s} {p.tokens_per_second:7.2f} tok/s (x{row['speedup_vs_no_prefetch_same_lane']:.3f})  hit {s['hit_rate']:.3f} on-time "
                      f"{s['on_time_hit_rate']:.3f} ({s['on_time_share_of_hits']:.3f} of hits)  cpu/tok "
                      f"{s['cpu_experts_per_token']:.1f}  | resident {p.limits['all_resident_tokens_per_second']:.1f} "
                      f"belady-link {p.limits['link_bound_belady_tokens_per_second']:.1f} deep-oracle "
                      f"{p.limits['deep_oracle_tokens_per_second']:.1f}", flush=True)
    settings = {"trace": shown(args.trace), "tokens": int(trace.routed_ids.shape[0]), "lookahead": 3,
                "cpu_profile": args.cpu, "cross_trace": args.cross_trace, "cross_lookahead": args.cross_lookahead,
                "cross_window": args.cross_window, "cross_margin": args.cross_margin}
    print(f"wrote {write_json_atomic(args.out, {**result_metadata('cpu'), 'settings': settings, 'results': rows})}")


if __name__ == "__main__":
    main()
