"""What the attention peek costs and buys in the Mixtral-8x7B projection: lru-layer + m2r2 at lookahead
1/2/3 for a v2 trace and a peek trace (the simulator charges the peek's attention and stand-in per predicted
layer), int4 experts, RTX 4090 (4 of 8 slots per layer) and RTX 3060 (what fits), with and without the CPU lane.

    python benchmarks/peek_cost.py --v2 V2.npz --peek PEEK.npz [--max-tokens 2048]
"""
import argparse

from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.sim import get_cpu, get_hardware
from moe_offload.analysis.trace import load_trace, trace_prefix
from moe_offload.results import result_metadata, write_json_atomic

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--v2", required=True)
ap.add_argument("--peek", required=True)
ap.add_argument("--max-tokens", type=int, default=2048)
ap.add_argument("--out", default="benchmarks/results/peek_cost_sim.json")
args = ap.parse_args()
cfg, cpu = model_config("mixtral-8x7b"), get_cpu("desktop-ddr5-2ch")
rows = []
for name, path in (("v2", args.v2), ("peek", args.peek)):
    tr = trace_prefix(load_trace(path), args.max_tokens)
    for hw, cap in (("rtx4090-pcie4", 128), ("rtx3060-pcie3", None)):
        for lane in (None, cpu):
            for la in (1, 2, 3):
                p = simulate(tr, cfg, get_hardware(hw), "int4", cap, "m2r2", "lru-layer", lookahead=la,
                             chunk_bytes=8 << 20, cpu=lane, deep_oracle_bound=False)
                s = p.settings
                rows.append({"adapter": name, "hardware": hw, "slots_per_layer": s["slots_per_layer"],
                             "cpu_lane": lane is not None, "lookahead": la, "tokens_per_second": p.tokens_per_second,
                             "on_time_share_of_hits": s["on_time_share_of_hits"],
                             "predictor_ms_per_token": s["predictor_ms_per_token"]})
                print(rows[-1], flush=True)
settings = {"v2_trace": args.v2, "peek_trace": args.peek, "tokens": args.max_tokens, "policy": "lru-layer",
            "expert_dtype": "int4", "link": "chunked 8 MiB", "cpu_profile": "desktop-ddr5-2ch"}
print("wrote", write_json_atomic(args.out, {**result_metadata("cpu"), "settings": settings, "results": rows}))
