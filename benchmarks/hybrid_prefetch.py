"""Prefetch under the CPU lane (hybrid), like for like: Mixtral-8x7B decode tokens/s projected with the
lane on in both runs, m2r2 prefetch (lru-layer, the trace's whole lookahead, margins 0..3) against no
prefetch, per hardware profile, CPU profile and expert format. It chose the runtime's defaults with the
CPU lane on (runtime.LANE_CROSS_MARGIN, LANE_AUTO_OFF): the best geometric-mean margin over the
cross-token traces, and no auto prefetch from within-token adapters (their geometric mean is below 1).

    python benchmarks/hybrid_prefetch.py --trace T.npz [--trace ...] [--out benchmarks/results/hybrid_prefetch.json]
"""

from __future__ import annotations

import argparse
import math

from moe_offload import MoeOffloadError
from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.sim import get_cpu, get_hardware
from moe_offload.analysis.trace import load_trace, trace_prefix
from moe_offload.results import result_metadata, write_json_atomic

from _paths import shown

CHUNK = 8 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", required=True, help="a trace with m2r2 predictions (repeatable)")
    ap.add_argument("--hardware", default="rtx4090-pcie4,rtx3060-pcie3")
    ap.add_argument("--cpu", default="desktop-ddr5-2ch,desktop-ddr4-2ch")
    ap.add_argument("--expert-dtype", default="int4,bf16")
    ap.add_argument("--margins", default="0,1,2,3")
    ap.add_argument("--policy", default="lru-layer", help="eviction policy of both runs")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/hybrid_prefetch.json")
    args = ap.parse_args()
    cfg = model_config("mixtral-8x7b")
    margins = [int(m) for m in args.margins.split(",")]
    rows = []
    for path in args.trace:
        tr = trace_prefix(load_trace(path), args.max_tokens)
        D = tr.preds["m2r2"].shape[2]
        is_cross = bool((tr.meta or {}).get("m2r2", {}).get("cross_token"))
        for hw_key in args.hardware.split(","):
            for cpu_key in args.cpu.split(","):
                for dtype in args.expert_dtype.split(","):
                    hw, cpu = get_hardware(hw_key), get_cpu(cpu_key)
                    capacity = 128 if (hw_key, dtype) == ("rtx4090-pcie4", "int4") else None  # 4 of 8: the target row

                    def sim(pred, margin=0):
                        return simulate(tr, cfg, hw, dtype, capacity, pred, args.policy, lookahead=D, margin=margin,
                                        window=1, chunk_bytes=CHUNK, cpu=cpu, deep_oracle_bound=False)
                    try:
                        base = sim("none")
                    except MoeOffloadError as exc:  # fewer slots than lru-layer needs (e.g. bf16 on 12 GB)
                        print(f"skipped {hw_key} {cpu_key} {dtype}: {exc}")
                        continue
                    for m in margins:
                        p = sim("m2r2", m)
                        s = p.settings
                        r = {"trace": shown(path), "hardware": hw_key, "cpu": cpu_key, "expert_dtype": dtype,
                             "slots_per_layer": s["slots_per_layer"], "lookahead": D, "margin": m,
                             "none_tokens_per_second": base.tokens_per_second, "tokens_per_second": p.tokens_per_second,
                             "speedup": p.tokens_per_second / base.tokens_per_second, "hit_rate": s["hit_rate"],
                             "on_time_share_of_hits": s["on_time_share_of_hits"],
                             "cpu_experts_per_token": s["cpu_experts_per_token"],
                             "predictor_ms_per_token": s["predictor_ms_per_token"], "cross_token": is_cross}
                        rows.append(r)
                        print(f"{path.split('/')[-1]:22s} {hw_key:14s} {cpu_key:17s} {dtype:5s} {s['slots_per_layer']:4.1f}/layer "
                              f"D={D:2d} margin {m}: none {base.tokens_per_second:6.2f}  m2r2 {p.tokens_per_second:6.2f} "
                              f"x{r['speedup']:.3f}  on time {r['on_time_share_of_hits']:.3f}", flush=True)
    def geomean(keep) -> dict[int, float]:
        out = {}
        for m in margins:
            sel = [r["speedup"] for r in rows if r["margin"] == m and keep(r)]
            if sel:
                out[m] = math.exp(sum(map(math.log, sel)) / len(sel))
        return out
    geo = geomean(lambda r: True)
    cross = geomean(lambda r: r["cross_token"])
    within = geomean(lambda r: not r["cross_token"])
    best = max(cross or geo, key=(cross or geo).get)
    for name, g in (("all traces", geo), ("cross-token adapters", cross), ("within-token adapters", within)):
        if g:
            print(f"geometric-mean speedup over no prefetch by margin, {name}: " + ", ".join(f"{m}: {v:.3f}" for m, v in g.items()))
    print(f"best margin for cross-token adapters with the CPU lane: {best}")
    settings = {"traces": args.trace, "hardware": args.hardware, "cpu": args.cpu, "expert_dtype": args.expert_dtype,
                "policy": args.policy, "link_chunk_bytes": CHUNK, "max_tokens": args.max_tokens,
                "geomean_speedup_by_margin": geo, "geomean_cross_token": cross, "geomean_within_token": within,
                "best_margin_cross_token": best}
    print(f"wrote {write_json_atomic(args.out, {**result_metadata('cpu'), 'settings': settings, 'results': rows})}")


if __name__ == "__main__":
    main()
