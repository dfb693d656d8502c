#!/usr/bin/env python
"""Decode speed of `moe-offload generate` vs transformers' generate, same run, same machine, on the
bundled model and on a second model of another shape that the script builds (8 layers, hidden 256,
8 experts, top-2, random weights written by transformers' save_pretrained, no EOS), plus the peak RSS
of loading. Rows: the default (on cpu: every expert resident), an expert cache of half the experts
with and without a predictor, and --no-offload. Writes JSON.

    python benchmarks/cpu_generate.py [--model PATH] [--no-second-model] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import moe_offload
from moe_offload.results import result_metadata, write_json_atomic

from _paths import shown

PROMPT = "And it came to pass"
RSS_PROBE = """
import resource, json, psutil
import moe_offload, torch
rss0 = psutil.Process().memory_info().rss
m = moe_offload.load({path!r}, device="cpu", **json.loads({opts!r}))
rss1 = psutil.Process().memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rss_after_imports_mb": rss0 / 2**20, "rss_after_load_mb": rss1 / 2**20,
                  "peak_rss_mb": peak / 1024}}))
"""


def peak_rss(path: str, opts: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", RSS_PROBE.format(path=path, opts=json.dumps(opts))], capture_output=True,
                       text=True, check=True, cwd="/")
    d = json.loads(r.stdout)
    return {**d, "load_delta_mb": d["rss_after_load_mb"] - d["rss_after_imports_mb"]}


def time_ours(m, prompt_ids: list[int], n: int, repeats: int) -> dict:
    m.generate(prompt_ids, max_new_tokens=8)  # warm-up
    runs = []
    for _ in range(repeats):
        res = m.generate(prompt_ids, max_new_tokens=n)
        assert len(res.token_ids) == n, "the model stopped early; use another prompt"
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


def second_model(folder: Path) -> Path:
    """8 layers, hidden 256, 8 experts, top-2, random weights, no EOS (so every run is full length)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, bos_token_id=1, eos_token_id=None, sliding_window=None,
                        tie_word_embeddings=False)
    MixtralForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def bench_model(path: str, prompt_ids: list[int], n: int, repeats: int) -> dict:
    """Every row for one model, then transformers on the same prompt ids."""
    cfg = moe_offload.load(path, device="cpu").config
    half = cfg.num_local_experts // 2
    variants = {"default": {}, f"cache_per_layer_{half}_default_predictor": {"cache_per_layer": half},
                f"cache_per_layer_{half}_no_predictor": {"cache_per_layer": half, "predictor": "none"},
                "no_offload": {"offload": False}}
    rows = {}
    for name, opts in variants.items():
        m = moe_offload.load(path, device="cpu", **opts)
        rows[name] = time_ours(m, prompt_ids, n, repeats)
        rows[name]["expert_cache"] = m.expert_cache is not None
        print(f"  {name:38s} decode {rows[name]['decode_tok_s']:7.1f} tok/s  end-to-end "
              f"{rows[name]['end_to_end_tok_s']:7.1f} tok/s", flush=True)
    hf = time_hf(path, prompt_ids, n, repeats)
    same = hf["token_ids"] == rows["no_offload"]["token_ids"]
    print(f"  {'transformers generate':38s} end-to-end {hf['end_to_end_tok_s']:7.1f} tok/s  (same tokens: {same})")
    ratios = {name: r["end_to_end_tok_s"] / hf["end_to_end_tok_s"] for name, r in rows.items()}
    print("  end-to-end vs transformers: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
    rss = {name: peak_rss(path, opts) for name, opts in (("default", {}), ("no_offload", {"offload": False}))}
    return {"path": shown(path), "prompt_ids": prompt_ids,
            "ours": {k: {kk: vv for kk, vv in v.items() if kk != "token_ids"} for k, v in rows.items()},
            "transformers": {"end_to_end_tok_s": hf["end_to_end_tok_s"], "same_tokens_as_ours": same},
            "ratio_over_transformers": ratios, "peak_rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Mixtral folder (default: the bundled model)")
    ap.add_argument("--no-second-model", action="store_true", help="skip the built 8-layer hidden-256 model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu_generate.json"))
    args = ap.parse_args()
    models = {"bundled" if args.model is None else "model": str(args.model or moe_offload.bundled_model_path())}
    tmp = tempfile.TemporaryDirectory()
    if not args.no_second_model:
        models["second_8L_h256"] = str(second_model(Path(tmp.name)))
    results = {}
    for name, path in models.items():
        m = moe_offload.load(path, device="cpu")
        prompt_ids = m.encode(PROMPT) if m.tokenizer is not None else [1, 17, 230, 42, 9, 311]
        print(f"{name}: {shown(path)}", flush=True)
        results[name] = bench_model(path, prompt_ids, args.new_tokens, args.repeats)
    out = {**result_metadata("cpu"), "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
           "repeats": args.repeats, "models": results}
    print(f"wrote {write_json_atomic(args.out, out)}")


if __name__ == "__main__":
    main()
