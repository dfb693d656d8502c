#!/usr/bin/env python
"""The vLLM plugin on CPU: decode tokens/s and expert-cache hit rates at several slots per layer S vs
plain vLLM (no plugin loaded), same machine, same run, on a Mixtral-shaped model the script builds with
transformers' save_pretrained (random weights, fp32; so routing is near-uniform and the hit rate is
close to S/E: a floor, not what a trained model's skewed routing gives). Needs a vLLM environment
(docs/vllm.md). Each engine runs in its own process (tests/vllm_runner.py); tokens/s counts the
generated tokens of one `generate` call over a batch of prompts (prefill included), after start-up.
Hit rates count the generate call only (stats after it minus stats after start-up).

    python benchmarks/vllm_plugin.py [--slots 2,4,6] [--batch 4] [--new-tokens 64] [--layers 4]
        [--hidden 512] [--intermediate 1024] [--experts 8] [--top-k 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "vllm_runner.py"


def build(path: Path, a: argparse.Namespace) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                     num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                     num_key_value_heads=max(1, a.hidden // 256), head_dim=64,
                                     num_local_experts=a.experts, num_experts_per_tok=a.top_k,
                                     max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") or "lm_head" in n:
                p.normal_(0, 0.2)
    model.to(torch.float32).save_pretrained(path)


def run(tmp: Path, model: Path, name: str, prompts: list, a: argparse.Namespace, slots: int | None) -> dict:
    out = tmp / f"{name}.json"
    args = {"model": str(model), "prompts": prompts, "max_tokens": a.new_tokens, "out": str(out),
            "solo": False, "batch": True, "logprobs": False, "plugins": slots is not None}
    if slots is not None:
        args["moe_offload"] = {"cache_per_layer": slots, "stats_path": str(tmp / f"{name}-stats.json")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"vllm_plugin: the {name} engine failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="2,4,6")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_plugin.json"))
    a = ap.parse_args()
    from moe_offload.results import result_metadata, write_json_atomic
    import vllm

    slots = [int(s) for s in a.slots.split(",")]
    prompts = [[(7 * i + 13 * j) % 1000 + 1 for j in range(16 + 4 * i)] for i in range(a.batch)]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build(tmp / "model", a)
        plain = run(tmp, tmp / "model", "plain", prompts, a, None)
        n_tokens = sum(len(r["tokens"]) for r in plain["batch"])
        rows = [{"config": "plain vLLM", "cache_per_layer": a.experts, "tokens_per_s": n_tokens / plain["seconds"]["batch"],
                 "generate_seconds": plain["seconds"]["batch"], "hit_rate": None,
                 "registered_expert_bytes": plain["registered"][0]["routed_experts"],
                 "registered_total_bytes": plain["registered"][0]["total"], "tokens_equal_plain": True}]
        for s in slots:
            res = run(tmp, tmp / "model", f"s{s}", prompts, a, s)
            (before,), (after,) = res["stats_start"].values(), res["stats"].values()
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            rows.append({"config": f"plugin S={s}", "cache_per_layer": s,
                         "tokens_per_s": n_tokens / res["seconds"]["batch"], "generate_seconds": res["seconds"]["batch"],
                         "hit_rate": hits / (hits + misses), "hits": hits, "misses": misses,
                         "hit_rate_incl_startup": after["hit_rate"],
                         "bytes_copied_per_token": (after["bytes_h2d"] - before["bytes_h2d"]) / n_tokens,
                         "registered_expert_bytes": res["registered"][0]["routed_experts"],
                         "registered_total_bytes": res["registered"][0]["total"],
                         "resident_expert_bytes": after["resident_expert_bytes"],
                         "host_store_bytes": after["host_store_bytes"],
                         "tokens_equal_plain": [r["tokens"] for r in res["batch"]] == [r["tokens"] for r in plain["batch"]]})
    for r in rows:
        print(f"{r['config']:>14}: {r['tokens_per_s']:7.1f} tok/s  hit rate {r['hit_rate'] if r['hit_rate'] is None else round(r['hit_rate'], 3)}"
              f"  expert bytes registered {r['registered_expert_bytes']:,}  tokens equal plain: {r['tokens_equal_plain']}")
    meta = result_metadata("cpu")
    meta["vllm"] = vllm.__version__
    write_json_atomic(a.out, {**meta, "model": {"family": "mixtral", "layers": a.layers, "hidden": a.hidden,
                                                "intermediate": a.intermediate, "experts": a.experts, "top_k": a.top_k,
                                                "dtype": "float32", "weights": "random"},
                              "batch": a.batch, "new_tokens": a.new_tokens, "enforce_eager": True, "rows": rows})


if __name__ == "__main__":
    main()
