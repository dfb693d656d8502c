#!/usr/bin/env python
"""Copy-failure injection: runs that complete with exactly the fault-free tokens, per failure rate.

    python benchmarks/fault_injection.py [--runs 20] [--rates 0.01,0.05,0.10] [--out JSON]

Each run loads the bundled model offloaded (2 slots per layer, lru: many copies), makes every copy
attempt fail with probability `rate` (its own seed per run) and generates --tokens greedy tokens.
A run counts as exact when it completes with the fault-free run's tokens; retries (bounded,
moe_offload.offload.transfer.COPY_RETRIES) are counted from the stats.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from moe_offload import runtime
from moe_offload.offload.transfer import COPY_RETRIES, CopyFailed, CopyFaults
from moe_offload.results import result_metadata, write_json_atomic
from moe_offload.options import OffloadConfig

PROMPT = "And God said, Let there be light"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rates", default="0.01,0.05,0.10")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/fault_injection.json")
    args = ap.parse_args()
    want = runtime.load(device="cpu", offload=False).generate(PROMPT, max_new_tokens=args.tokens).token_ids
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        exact = wrong = failed = retries = copies = 0
        t0 = time.perf_counter()
        for run in range(args.runs):
            rng = random.Random(1000 * run + int(rate * 1000))
            with runtime.load(device="cpu", cache_per_layer=2, config=OffloadConfig.make(policy="lru")) as m:
                m.expert_cache.engine.faults = CopyFaults(fail=lambda key: rng.random() < rate)
                try:
                    r = m.generate(PROMPT, max_new_tokens=args.tokens)
                except CopyFailed:
                    failed += 1
                    continue
                exact += r.token_ids == want
                wrong += r.token_ids != want
                retries += r.stats["copy_retries"]
                copies += r.stats["misses"]
        rows.append({"failure_rate": rate, "runs": args.runs, "exact": exact, "wrong_tokens": wrong,
                     "failed_requests": failed, "copy_retries": retries, "demand_copies": copies,
                     "seconds": time.perf_counter() - t0})
        print(f"rate {rate:.2f}: {exact}/{args.runs} exact, {wrong} wrong, {failed} failed; "
              f"{retries} retries over {copies} demand copies", flush=True)
    out = {**result_metadata("cpu"), "max_retries": COPY_RETRIES, "tokens": args.tokens, "results": rows}
    print("saved", write_json_atomic(args.out, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
