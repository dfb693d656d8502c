"""Held-out perplexity and CPU decode tokens/s of the bundled model per expert format.

    python benchmarks/quant_ppl.py [--max-tokens 2048] [--decode-tokens 32]

Perplexity: next-token loss over the held-out text (moe_offload.bundled_heldout_text()), in windows of
the model's context, each window scored on its own. Formats: fp32 (reference), bf16 (dtype bfloat16),
int8, int4 g32/g64/g128 (fp32 compute, experts quantized on load); int8 experts at bf16 compute, with
and without int8 dense weights (dense_dtype); and, scored through the CPU decode kernels for every token
("decode kernels": what decode computes, where scoring a window would otherwise dequantize and run a
GEMM), int8 / int4 experts at bf16 compute with exact and with int8 activations (cpu_activations).
Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import moe_offload
from moe_offload.kernels import cpu_gemv
from moe_offload.options import OffloadConfig
from moe_offload.results import result_metadata, write_json_atomic

FORMATS = [("fp32", {}), ("bf16", {"dtype": "bfloat16", "expert_dtype": "bf16"}),
           ("int8", {"expert_dtype": "int8"}), ("int4-g32", {"expert_dtype": "int4", "group_size": 32}),
           ("int4-g64", {"expert_dtype": "int4", "group_size": 64}),
           ("int4-g128", {"expert_dtype": "int4", "group_size": 128}),
           # bf16 compute, and the dense weights in int8 (dense_dtype; what a q8_0 GGUF quantizes too)
           ("int8@bf16", {"dtype": "bfloat16", "expert_dtype": "int8"}),
           ("int8@bf16 + dense int8", {"dtype": "bfloat16", "expert_dtype": "int8", "dense_dtype": "int8"}),
           ("bf16 + dense int8", {"dtype": "bfloat16", "expert_dtype": "bf16", "dense_dtype": "int8"}),
           # through the decode kernels (DECODE_KERNELS): exact against int8 activations
           ("int8@bf16 decode kernels exact-act",
            {"dtype": "bfloat16", "expert_dtype": "int8", "cpu_activations": "exact"}),
           ("int8@bf16 decode kernels int8-act",
            {"dtype": "bfloat16", "expert_dtype": "int8", "cpu_activations": "int8"}),
           ("int4-g32@bf16 decode kernels exact-act",
            {"dtype": "bfloat16", "expert_dtype": "int4", "group_size": 32, "cpu_activations": "exact"}),
           ("int4-g32@bf16 decode kernels int8-act",
            {"dtype": "bfloat16", "expert_dtype": "int4", "group_size": 32, "cpu_activations": "int8"}),
           ("int8@bf16 + dense int8 decode kernels int8-act",
            {"dtype": "bfloat16", "expert_dtype": "int8", "dense_dtype": "int8", "cpu_activations": "int8"})]
DECODE_KERNELS = "decode kernels"  # formats whose name says so score every token through cpu_gemv's kernels


QUANT_MAX_ROWS = cpu_gemv.QUANT_MAX_ROWS


def perplexity(m, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = m.logits(chunk[:-1])  # [T, V] float32
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens scored (default 2048)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed per format (default 32)")
    ap.add_argument("--text", default=None, help="held-out text (default: the bundled model's)")
    ap.add_argument("--formats", default=",".join(n for n, _ in FORMATS),
                    help="comma list of formats to score (default all: %(default)s)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "quant_ppl.json"))
    args = ap.parse_args()
    text = (open(args.text, encoding="utf-8").read() if args.text
            else moe_offload.bundled_heldout_text().read_text())
    wanted = args.formats.split(",")
    unknown = sorted(set(wanted) - {n for n, _ in FORMATS})
    if unknown:
        ap.error(f"--formats: unknown {unknown}; valid: {[n for n, _ in FORMATS]}")
    rows = []
    for name, opts in (f for f in FORMATS if f[0] in wanted):
        cpu_gemv.QUANT_MAX_ROWS = 1 << 30 if DECODE_KERNELS in name else QUANT_MAX_ROWS
        t0 = time.perf_counter()
        with moe_offload.load(args.model, config=OffloadConfig.make(device="cpu", **opts)) as m:
            load_s = time.perf_counter() - t0
            ids = m.encode_text(text)[: args.max_tokens]
            window = min(m.runtime.max_seq_len, 256)
            ppl = perplexity(m, ids, window)
            res = m.generate("In the beginning", max_new_tokens=args.decode_tokens)
            row = {"format": name, "options": opts, "perplexity": ppl, "tokens_scored": len(ids) - 1,
                   "window": window, "load_seconds": load_s,
                   "decode_tokens_per_second": res.stats["decode_tokens_per_second"]}
        rows.append(row)
        print(f"{name:40s} ppl {ppl:8.3f}  decode {row['decode_tokens_per_second']:6.1f} tok/s  "
              f"load {load_s:5.2f} s", flush=True)
    out = {**result_metadata("cpu"), "torch_threads": torch.get_num_threads(), "model": args.model or "bundled", "text": args.text or "bundled held-out",
           "results": rows}
    print("saved", write_json_atomic(args.out, out))


if __name__ == "__main__":
    main()
