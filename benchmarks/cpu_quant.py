#!/usr/bin/env python
"""CPU kernels for quantized experts, and CPU decode speed per expert format.

1. kernels: one SwiGLU expert (w13 GEMM, SiLU*up, w2 GEMM) at Mixtral-734M shapes (hidden 1024,
   intermediate 3584) per candidate: float F.linear (fp32, bf16 weights), dequantize-then-matmul (the
   reference) and PyTorch's weight-only CPU ops (int8 `_weight_int8pack_mm`, int4
   `_weight_int4pack_mm_for_cpu`), at compute dtypes float32 and bfloat16, for 1 token (decode) and
   several (prefill). Reports us per expert and GB/s (the format's expert bytes over that time; experts
   are rotated over more memory than the last-level cache holds) and the crossover token count.
2. decode: tokens/s of `generate` per format (fp32, bf16, int8, int4 g128; quantized ones at float32 and
   bfloat16 compute) on the bundled model and on the 734M model.

The 734M model is the one `benchmarks/cpu_vs_llamacpp.py --make-model` writes (that script compares
with llama.cpp, same run):

    python benchmarks/cpu_quant.py --model-734m DIR [--threads 2]
    python benchmarks/cpu_quant.py                                   # bundled model only
    python benchmarks/cpu_quant.py --smoke --out q.json              # tiny shapes, bundled model only

Prints a table and writes benchmarks/results/cpu_quant.json. Run it on a quiet machine: every number
here is a median of repeated runs, but other work on the cores still shows.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import moe_offload
from moe_offload.kernels import expert_ffn
from moe_offload.kernels.quant_cpu import CpuQuantPool
from moe_offload.formats import expert_bytes, get_format
from moe_offload.results import result_metadata, write_json_atomic

from _paths import env_path, shown

ROTATE_BYTES = 160 * 2**20  # experts cycled per candidate: more than a last-level cache holds
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def time_calls(fn, n_items: int, budget_s: float) -> tuple[float, float]:
    """(median, min) seconds of fn(i) over calls cycling i through n_items (at least one full cycle).
    On a busy machine the minimum is the better estimate of the quiet speed."""
    fn(0)
    t0 = time.perf_counter()
    fn(1 % n_items)
    first = time.perf_counter() - t0
    calls = max(n_items, min(200, math.ceil(budget_s / max(first, 1e-6))))
    times = []
    for c in range(calls):
        t0 = time.perf_counter()
        fn(c % n_items)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def float_rows(hidden: int, inter: int, dtype: torch.dtype, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    w13, w2 = torch.randn(2 * inter, hidden) * 0.02, torch.randn(hidden, inter) * 0.02
    return [(w13.to(dtype).clone(), w2.to(dtype).clone()) for _ in range(n)]


def quant_pool(hidden: int, inter: int, fmt: str, g: int, n: int):
    """n copies (distinct memory) of one quantized random expert, as a QuantPool."""
    torch.manual_seed(0)
    w1, w3, w2 = (torch.randn(inter, hidden) * 0.02, torch.randn(inter, hidden) * 0.02,
                  torch.randn(hidden, inter) * 0.02)
    row = torch.empty(expert_bytes(hidden, inter, fmt, g), dtype=torch.uint8)
    f = get_format(fmt, g)
    f.write(row, f.pack(w1, w3, w2), hidden, inter)
    return f.pool_views(row[None].repeat(n, 1), hidden, inter)


def n_rotate(nbytes: int) -> int:
    return max(2, min(16, math.ceil(ROTATE_BYTES / nbytes)))


def kernel_rows(hidden: int, inter: int, tokens: list[int], budget_s: float) -> list[dict]:
    """One row per (format, compute dtype, candidate, tokens)."""
    rows = []

    def add(fmt, dname, cand, nbytes, fn_for_tokens, n_items):
        for t in tokens:
            sec, best = time_calls(fn_for_tokens(t), n_items, budget_s)
            rows.append({"format": fmt, "compute_dtype": dname, "candidate": cand, "tokens": t,
                         "us_per_expert": sec * 1e6, "GB_s": nbytes / sec / 1e9, "us_per_expert_min": best * 1e6,
                         "GB_s_at_min": nbytes / best / 1e9, "expert_bytes": nbytes})
            print(f"  {fmt:10s} {dname:9s} {cand:22s} tokens {t:4d}: {sec * 1e6:10.0f} us  "
                  f"{nbytes / sec / 1e9:6.1f} GB/s  (min {best * 1e6:.0f} us, {nbytes / best / 1e9:.1f} GB/s)",
                  flush=True)

    for fmt, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        nbytes = 3 * hidden * inter * dt.itemsize
        ws = float_rows(hidden, inter, dt, n_rotate(nbytes))
        add(fmt, str(dt)[6:], "F.linear", nbytes,
            lambda t, ws=ws, dt=dt: (lambda i, x=torch.randn(t, hidden).to(dt): expert_ffn(x, *ws[i])), len(ws))
    for fmt, g in (("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)):
        nbytes = expert_bytes(hidden, inter, fmt, g)
        pool = quant_pool(hidden, inter, fmt, g, n_rotate(nbytes))
        name = fmt if fmt == "int8" else f"{fmt} g{g}"
        for dname, dt in DTYPES.items():
            fast = CpuQuantPool(pool, dt, max_tokens=1 << 30)
            add(name, dname, "dequant_then_matmul", nbytes,
                lambda t, dt=dt: (lambda i, x=torch.randn(t, hidden).to(dt): expert_ffn(x, *pool.dequant(i, dt))),
                pool.num_slots)
            add(name, dname, "weight_only_op", nbytes,
                lambda t, dt=dt, fast=fast: (lambda i, x=torch.randn(t, hidden).to(dt): fast.ffn(i, x)),
                pool.num_slots)
    return rows


def crossovers(rows: list[dict]) -> dict:
    """Per (format, dtype): the most tokens at which the weight-only op still beats dequantize-then-matmul
    (by the minimum time of each: the least disturbed by other work)."""
    out = {}
    for r in rows:
        if r["candidate"] != "weight_only_op":
            continue
        ref = next(x for x in rows if x["candidate"] == "dequant_then_matmul" and x["format"] == r["format"]
                   and x["compute_dtype"] == r["compute_dtype"] and x["tokens"] == r["tokens"])
        key = f"{r['format']} {r['compute_dtype']}"
        if r["us_per_expert_min"] < ref["us_per_expert_min"]:
            out[key] = max(out.get(key, 0), r["tokens"])
        else:
            out.setdefault(key, 0)
    return out


DECODE_VARIANTS = {  # name -> load options
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8 @float32": {"dtype": "float32", "expert_dtype": "int8"},
    "int8 @bfloat16": {"dtype": "bfloat16", "expert_dtype": "int8"},
    "int4 g128 @float32": {"dtype": "float32", "expert_dtype": "int4", "group_size": 128},
    "int4 g128 @bfloat16": {"dtype": "bfloat16", "expert_dtype": "int4", "group_size": 128},
}


def decode_row(path: str, opts: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    m = moe_offload.load(path, moe_offload.OffloadConfig.make(device="cpu", offload=False, **opts))
    load_s = time.perf_counter() - t0
    object.__setattr__(m.config, "eos_token_ids", ())  # full-length runs
    m.generate(prompt, max_new_tokens=4)
    runs = [m.generate(prompt, max_new_tokens=new_tokens).stats["decode_tokens_per_second"] for _ in range(repeats)]
    extra = getattr(m.model.experts, "extra_bytes", 0)
    return {"options": opts, "decode_tok_s": runs, "median_tok_s": statistics.median(runs), "load_s": load_s,
            "cpu_kernel_extra_ram_mb": extra / 2**20}


def decode_rows(models: dict[str, str], new_tokens: int, repeats: int, variants: dict) -> dict:
    out = {}
    for name, path in models.items():
        out[name] = {"path": shown(path)}
        for vname, opts in variants.items():
            r = decode_row(path, opts, [1, 17, 230], new_tokens, repeats)
            out[name][vname] = r
            print(f"  {name:8s} {vname:26s} {r['median_tok_s']:7.1f} tok/s  {[round(x, 1) for x in r['decode_tok_s']]}"
                  f"  (load {r['load_s']:.1f} s, kernel RAM +{r['cpu_kernel_extra_ram_mb']:.0f} MB)", flush=True)
    return out


def print_table(kern: list[dict], cross: dict, dec: dict) -> None:
    print("\nexpert kernels (median us per expert / GB/s):")
    tokens = sorted({r["tokens"] for r in kern})
    print(f"  {'format':10s} {'dtype':9s} {'candidate':22s} " + " ".join(f"{'t=' + str(t):>16s}" for t in tokens))
    keys = list(dict.fromkeys((r["format"], r["compute_dtype"], r["candidate"]) for r in kern))  # first-seen order
    for k in keys:
        cells = [next(r for r in kern if (r["format"], r["compute_dtype"], r["candidate"]) == k and r["tokens"] == t)
                 for t in tokens]
        print(f"  {k[0]:10s} {k[1]:9s} {k[2]:22s} " + " ".join(
            f"{c['us_per_expert']:8.0f}/{c['GB_s']:5.1f}  " for c in cells))
    print("  weight-only op wins up to tokens: " + ", ".join(f"{k} {v}" for k, v in cross.items()))
    print("\ndecode tok/s (median):")
    for model, rows in dec.items():
        print(f"  {model}: " + ", ".join(f"{k} {v['median_tok_s']:.1f}" for k, v in rows.items() if k != "path"))


def fail(msg: str) -> None:
    sys.exit(f"cpu_quant.py: error: {msg}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-734m", default=None, metavar="DIR",
                    help="the 734M model (made by benchmarks/cpu_vs_llamacpp.py --make-model; "
                         "default: $MOE_OFFLOAD_734M, else bundled model only)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, bundled model only (for tests)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu_quant.json"))
    args = ap.parse_args()
    model_734m = env_path(args.model_734m, "MOE_OFFLOAD_734M")
    if model_734m is not None and not (model_734m / "config.json").is_file():
        fail(f"--model-734m {model_734m}: no config.json there (make it with benchmarks/cpu_vs_llamacpp.py --make-model)")
    torch.set_num_threads(args.threads)
    shapes = (128, 256) if args.smoke else (1024, 3584)
    tokens = [1, 4] if args.smoke else [1, 4, 16, 64]
    print(f"kernels at hidden {shapes[0]}, intermediate {shapes[1]}, {args.threads} threads:", flush=True)
    kern = kernel_rows(*shapes, tokens, budget_s=0.02 if args.smoke else 0.5)
    cross = crossovers(kern)
    models = {"bundled": str(moe_offload.bundled_model_path())}
    missing = None
    if not args.smoke:
        if model_734m is not None:
            models["734m"] = str(model_734m)
        else:
            missing = "no --model-734m: 734M rows skipped"
            print(missing)
    variants = dict(list(DECODE_VARIANTS.items())[:3]) if args.smoke else DECODE_VARIANTS
    print("decode:", flush=True)
    dec = decode_rows(models, 4 if args.smoke else args.new_tokens, 1 if args.smoke else args.repeats, variants)
    print_table(kern, cross, dec)
    out = {**result_metadata("cpu"), "torch_threads": torch.get_num_threads(), "shapes": {"hidden": shapes[0],
           "intermediate": shapes[1]}, "kernels": kern, "weight_only_op_wins_up_to_tokens": cross,
           "decode": dec, "missing": missing,
           "note": "decode rows: load(path, OffloadConfig.make(device='cpu', offload=False, **options)), "
                   "prompt [1, 17, 230], EOS off, one warm-up, then `repeats` runs of new_tokens; load_s includes "
                   "quantizing on load"}
    print(f"wrote {write_json_atomic(args.out, out)}")


if __name__ == "__main__":
    main()
