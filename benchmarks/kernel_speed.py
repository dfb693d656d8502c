#!/usr/bin/env python
"""Fused-MoE kernel benchmark on a GPU: Triton vs per-expert loop vs torch._grouped_mm.

Mixtral-8x7B expert shapes (H=4096, I=14336, E=8, k=2) in bf16 for T in {1, 4, 16, 64, 256}: median
time (triton.testing.do_bench), GB/s of expert weight bytes actually read (distinct routed experts x
bytes per expert) against the device's measured pinned host->device copy bandwidth, speedups, and
correctness against the loop reference in the same run. Writes JSON (see --out).

    python benchmarks/kernel_speed.py                  # on a GPU, ~1-2 minutes
    TRITON_INTERPRET=1 python benchmarks/kernel_speed.py --smoke   # tiny shapes on CPU: checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from moe_offload.kernels import fused_moe, fused_moe_grouped_mm, fused_moe_reference, grouped_mm_supported
from moe_offload.results import result_metadata, write_json_atomic

BF16_TOL = 3e-2  # as in tests/test_kernels.py


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> dict:
    """Median GB/s of pinned and pageable host->device copies of nbytes."""
    if device.type != "cuda":
        return {"pinned_gbps": None, "pageable_gbps": None}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, pin in (("pinned_gbps", True), ("pageable_gbps", False)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pin)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = nbytes / statistics.median(times) / 1e9
    return out


def bench(fn, device: torch.device) -> float:
    """Median seconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/kernels.json or benchmarks/results/)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.hidden, args.inter, args.tokens = 64, 96, "1,4,16"
    elif device.type != "cuda":
        raise SystemExit("benchmarks/kernel_speed.py needs a GPU (or --smoke with TRITON_INTERPRET=1 on CPU)")
    dtype = torch.bfloat16
    h, i, e, k = args.hidden, args.inter, args.experts, args.top_k
    g = torch.Generator(device="cpu").manual_seed(0)
    slots = e + 2  # two unused slots full of NaN: must never be read
    w13 = torch.full((slots, 2 * i, h), float("nan"), dtype=dtype, device=device)
    w2 = torch.full((slots, h, i), float("nan"), dtype=dtype, device=device)
    slot_of = torch.randperm(slots, generator=g)[:e].to(torch.int32).to(device)
    for x in range(e):
        w13[slot_of[x]] = (torch.randn(2 * i, h, generator=g) / h ** 0.5).to(dtype).to(device)
        w2[slot_of[x]] = (torch.randn(h, i, generator=g) / i ** 0.5).to(dtype).to(device)
    expert_bytes = 3 * h * i * 2
    bw = copy_bandwidth(device, expert_bytes)
    rows = []
    for t in [int(v) for v in args.tokens.split(",")]:
        hidden = torch.randn(t, h, generator=g).to(dtype).to(device)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device)
        w = torch.softmax(torch.randn(t, k, generator=g), -1).to(device)
        ref = fused_moe_reference(hidden, ids, w, w13, w2, slot_of)
        got = fused_moe(hidden, ids, w, w13, w2, slot_of, debug=True)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        read = len(set(ids.reshape(-1).tolist())) * expert_bytes
        t_triton = bench(lambda: fused_moe(hidden, ids, w, w13, w2, slot_of), device)
        t_loop = bench(lambda: fused_moe_reference(hidden, ids, w, w13, w2, slot_of), device)
        t_gmm = None
        if grouped_mm_supported(hidden, w13):
            try:
                t_gmm = bench(lambda: fused_moe_grouped_mm(hidden, ids, w, w13, w2, slot_of), device)
            except RuntimeError as exc:  # e.g. a GPU generation without grouped-mm support
                t_gmm = f"unavailable: {exc}".splitlines()[0]
        row = {"tokens": t, "max_rel_err_vs_loop": err, "correct": err < BF16_TOL, "expert_bytes_read": read,
               "triton_ms": t_triton * 1e3, "loop_ms": t_loop * 1e3,
               "grouped_mm_ms": t_gmm * 1e3 if isinstance(t_gmm, float) else t_gmm,
               "triton_weight_gbps": read / t_triton / 1e9, "speedup_vs_loop": t_loop / t_triton,
               "speedup_vs_grouped_mm": t_gmm / t_triton if isinstance(t_gmm, float) else None}
        rows.append(row)
        print(f"T={t:4d}  triton {row['triton_ms']:8.3f} ms  loop {row['loop_ms']:8.3f} ms  "
              f"grouped_mm {row['grouped_mm_ms'] if not isinstance(t_gmm, float) else f'{t_gmm * 1e3:8.3f} ms'}  "
              f"{row['triton_weight_gbps']:7.1f} GB/s  err {err:.2e}", flush=True)
    result = {**result_metadata(device), "shapes": {"hidden": h, "inter": i, "experts": e, "top_k": k,
              "dtype": "bfloat16", "smoke": args.smoke}, "copy_bandwidth": bw, "results": rows}
    out = args.out or os.path.join(os.environ.get("OUT") or "benchmarks/results", "kernels.json")
    print(f"wrote {write_json_atomic(out, result)}")


if __name__ == "__main__":
    main()
