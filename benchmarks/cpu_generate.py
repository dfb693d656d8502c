#!/usr/bin/env python
"""Decode speed of `moe-offload generate` on the bundled model vs transformers' generate, same run,
same machine, plus the peak RSS of loading. Writes JSON.

    python benchmarks/cpu_generate.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import moe_offload
from moe_offload.results import result_metadata, write_json_atomic

PROMPT = "And it came to pass"
RSS_PROBE = """
import resource, json, psutil
import moe_offload, torch
rss0 = psutil.Process().memory_info().rss
m = moe_offload.load(device="cpu", **json.loads({opts!r}))
rss1 = psutil.Process().memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rss_after_imports_mb": rss0 / 2**20, "rss_after_load_mb": rss1 / 2**20,
                  "peak_rss_mb": peak / 1024}}))
"""


def peak_rss(opts: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", RSS_PROBE.format(opts=json.dumps(opts))], capture_output=True,
                       text=True, check=True, cwd="/")
    d = json.loads(r.stdout)
    return {**d, "load_delta_mb": d["rss_after_load_mb"] - d["rss_after_imports_mb"]}


def time_ours(m, n: int, repeats: int) -> dict:
    m.generate(PROMPT, max_new_tokens=8)  # warm-up
    runs = []
    for _ in range(repeats):
        res = m.generate(PROMPT, max_new_tokens=n)
        assert len(res.token_ids) == n, "the bundled model stopped early; use another prompt"
        runs.append(res)
    best = max(runs, key=lambda r: r.stats["decode_tokens_per_second"])
    return {"decode_tok_s": statistics.median(r.stats["decode_tokens_per_second"] for r in runs),
            "end_to_end_tok_s": statistics.median(r.tokens_per_second for r in runs),
            "token_ids": best.token_ids, "hit_rate": best.stats.get("hit_rate")}


def time_hf(path, prompt_ids: list[int], n: int, repeats: int) -> dict:
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids])
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(x, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf.generate(x, **kw)
            times.append(time.perf_counter() - t0)
    return {"end_to_end_tok_s": n / statistics.median(times), "token_ids": out[0, len(prompt_ids):].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu_generate.json"))
    args = ap.parse_args()
    n = args.new_tokens
    rows = {}
    for name, opts in {"offload_all_slots_default": {}, "offload_cache_per_layer_4": {"cache_per_layer": 4},
                       "no_offload": {"offload": False}}.items():
        m = moe_offload.load(device="cpu", **opts)
        rows[name] = time_ours(m, n, args.repeats)
        print(f"{name:28s} decode {rows[name]['decode_tok_s']:7.1f} tok/s  end-to-end "
              f"{rows[name]['end_to_end_tok_s']:7.1f} tok/s", flush=True)
    prompt_ids = m.encode(PROMPT)
    hf = time_hf(moe_offload.bundled_model_path(), prompt_ids, n, args.repeats)
    same = hf["token_ids"] == rows["no_offload"]["token_ids"]
    print(f"{'transformers generate':28s} end-to-end {hf['end_to_end_tok_s']:7.1f} tok/s  (same tokens: {same})")
    rss = {name: peak_rss(opts) for name, opts in {"default": {}, "no_offload": {"offload": False}}.items()}
    for name, r in rss.items():
        print(f"RSS {name}: {r['rss_after_imports_mb']:.0f} MB after imports, {r['rss_after_load_mb']:.0f} MB after "
              f"load (+{r['load_delta_mb']:.0f} MB); process peak {r['peak_rss_mb']:.0f} MB")
    result = {**result_metadata("cpu"), "torch_threads": torch.get_num_threads(), "prompt": PROMPT,
              "new_tokens": n, "ours": {k: {kk: vv for kk, vv in v.items() if kk != "token_ids"} for k, v in rows.items()},
              "transformers": {"end_to_end_tok_s": hf["end_to_end_tok_s"], "same_tokens_as_ours": same},
              "ratio_ours_default_over_transformers": rows["offload_all_slots_default"]["end_to_end_tok_s"] / hf["end_to_end_tok_s"],
              "ratio_ours_no_offload_over_transformers": rows["no_offload"]["end_to_end_tok_s"] / hf["end_to_end_tok_s"],
              "peak_rss": rss}
    print(f"wrote {write_json_atomic(args.out, result)}")


if __name__ == "__main__":
    main()
