#!/usr/bin/env python
"""Projections of Mixtral-8x7B decode speed from a routing trace, for the README: a 24 GB PCIe 4 card
(RTX 4090) and a 12 GB PCIe 3 card (RTX 3060) with bf16, int8 and int4 experts (default capacity: what
fits) under LRU with no / next-gate / m2r2 prefetch, and the settings of
the mixtral-offloading report (2- and 3-bit experts on T4, RTX 3060, A100). Writes one JSON.

    moe-offload trace --text moe_offload/assets/heldout_kjv.txt --out heldout.npz \
        --accelerator moe_offload/assets/tiny-mixtral-accelerator.safetensors --lookahead 3
    python benchmarks/simulate_sweep.py --trace heldout.npz
"""

from __future__ import annotations

import argparse
import os

from moe_offload.analysis.bench import model_config, simulate
from moe_offload.results import result_metadata, write_json_atomic
from moe_offload.analysis.sim import get_hardware
from moe_offload.analysis.trace import trace_prefix, load_trace

from _paths import shown

RUNS = ([(hw, dt, p) for hw in ("rtx4090-pcie4", "rtx3060-pcie3") for dt in ("bf16", "int8", "int4")
         for p in ("none", "next-gate", "m2r2")]
        + [(hw, dt, "next-gate") for hw in ("t4-pcie3", "rtx3060-pcie3", "a100-pcie4") for dt in ("int2", "int3")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "simulate_mixtral8x7b.json"))
    args = ap.parse_args()
    trace = trace_prefix(load_trace(args.trace), args.max_tokens)
    cfg = model_config("mixtral-8x7b")
    rows = []
    for hw, dt, pred in RUNS:
        p = simulate(trace, cfg, get_hardware(hw), dt, None, pred)
        rows.append({"hardware": hw, "expert_dtype": dt, "predictor": pred, "tokens_per_second": p.tokens_per_second,
                     "per_token_seconds": p.per_token, "limits": p.limits, "settings": p.settings})
        print(f"{hw:14s} {dt:5s} {pred:9s} {p.tokens_per_second:7.2f} tok/s  (all resident "
              f"{p.limits['all_resident_tokens_per_second']:.1f}, Belady link bound "
              f"{p.limits['link_bound_belady_tokens_per_second']:.2f})", flush=True)
    meta = {**result_metadata("cpu"), "trace": shown(args.trace), "trace_meta": trace.meta, "tokens": len(trace.token_ids)}
    print(f"wrote {write_json_atomic(args.out, {**meta, 'results': rows})}")


if __name__ == "__main__":
    main()
