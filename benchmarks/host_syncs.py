"""Count device->host reads per MoE layer in a decode step (the CPU instrumented count).

Counts reads inside the model's forward pass (moe_offload.analysis.host_reads: the per-token logits
read and sampling are not counted; the copy thread's memcpys are not reads). It runs generate() for 1 and for
1 + STEPS new tokens on the bundled model (offloaded, default predictor) and reports (calls of the
longer run - calls of the shorter) / STEPS / layers. On CUDA each such read is a host sync that drains
the GPU queue. Two more syncs of the old code cannot be seen on a CPU (a pageable host-to-device copy
of the slot-table row, and event.synchronize() on late copies). Works against any version of the
public API (load/generate), so the same script measures the code before and after a change:

    python benchmarks/host_syncs.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import moe_offload
from moe_offload.analysis.host_reads import count_reads

from _paths import shown

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    m = moe_offload.load(device="cpu", cache_per_layer=4)  # offloaded, default predictor
    L = m.config.num_hidden_layers
    prompt = "In the beginning God created"
    m.generate(prompt, max_new_tokens=2)  # warm-up (lazy tables, first allocations)
    short = count_reads(m.model, lambda: m.generate(prompt, max_new_tokens=1))
    long = count_reads(m.model, lambda: m.generate(prompt, max_new_tokens=1 + args.steps))
    per_step = {k: (long[k] - short[k]) / args.steps for k in set(long) | set(short)}
    per_step = {k: v for k, v in sorted(per_step.items()) if v}
    total = sum(per_step.values())
    out = {"layers": L, "per_decode_step": per_step, "per_decode_step_total": total,
           "per_moe_layer": total / L, "version": shown(moe_offload.__file__)}
    print(json.dumps(out, indent=1))
    if args.json:
        from moe_offload.results import result_metadata, write_json_atomic

        write_json_atomic(args.json, {**result_metadata("cpu"), **out})


if __name__ == "__main__":
    main()
