#!/usr/bin/env python
"""Expert-cache hit rates of the eviction policies on a model's held-out text, plus the host cost of
the cache bookkeeping per layer.

Routing is recorded once over the text (teacher forcing, decode order), then replayed token by token
through the real ExpertCache (real copies on the copy engine, real policies) at 25/50/75/100% of all
experts resident. Prints a markdown table and writes JSON.

    python benchmarks/offload_hit_rates.py [--model PATH] [--text FILE] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import os

import torch
from tokenizers import Tokenizer

import moe_offload
from moe_offload.offload import ExpertCache, make_copy_engine, make_policy
from moe_offload.results import result_metadata, write_json_atomic
from moe_offload.analysis.trace import record_routing, replay

from _paths import shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled)")
    ap.add_argument("--text", default=None, help="text file (default: the bundled held-out text)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--policies", default="lru,lru-layer,lfu")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/offload_hit_rates.json)")
    args = ap.parse_args()
    m = moe_offload.load(args.model, device="cpu", cache_per_layer=10**6)  # all experts: the store is built
    text = open(args.text or moe_offload.bundled_heldout_text(), encoding="utf-8").read()
    ids = m.encode_text(text)[: args.max_tokens]
    trace = record_routing(m.model, ids, window=m.runtime.max_seq_len, show_progress=True)
    cfg = m.config
    total = cfg.num_hidden_layers * cfg.num_local_experts
    rows = []
    for policy in args.policies.split(","):
        for frac in [float(f) for f in args.fractions.split(",")]:
            slots = max(cfg.num_experts_per_tok * (cfg.num_hidden_layers if policy == "lru-layer" else 1),
                        round(frac * total))
            cache = ExpertCache(m.expert_cache.store, slots, make_policy(policy), torch.device("cpu"),
                                make_copy_engine(torch.device("cpu")))
            host = replay(cache, trace.routed_ids)
            st = cache.stats.to_dict()
            cache.engine.close()
            bookkeeping = (host["host_seconds"] - st["stall_seconds"]) / host["layer_steps"]
            rows.append({"policy": policy, "fraction_resident": frac, "slots": slots, "hit_rate": st["hit_rate"],
                         "misses_per_token": st["misses"] / len(ids), "bytes_h2d_per_token": st["bytes_h2d"] / len(ids),
                         "bookkeeping_us_per_layer": bookkeeping * 1e6,
                         "host_us_per_layer_incl_copy_waits": host["host_seconds"] / host["layer_steps"] * 1e6})
    print(f"\n{len(ids)} held-out tokens, {cfg.num_hidden_layers} layers x {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}\n")
    print("| policy | resident | slots | hit rate | misses/token | bookkeeping us/layer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['fraction_resident']:.0%} | {r['slots']} | {r['hit_rate']:.3f} | "
              f"{r['misses_per_token']:.2f} | {r['bookkeeping_us_per_layer']:.1f} |")
    out = args.out or os.path.join("benchmarks", "results", "offload_hit_rates.json")
    result = {**result_metadata("cpu"), "model": shown(m.path), "tokens": len(ids), "results": rows}
    print(f"wrote {write_json_atomic(out, result)}")


if __name__ == "__main__":
    main()
