#!/usr/bin/env python
"""Self-speculative decoding, measured: acceptance per draft position, tokens per verify pass, CPU
tokens/s plain vs speculative (same run, interleaved per prompt), expert bytes copied per generated token
at several cache sizes (speculative with the verify budget, the default, and without it: every drafted
position verified), and a projection for Mixtral-8x7B from the recorded verify passes.

    python benchmarks/speculative.py [--model DIR --accelerator FILE --heldout FILE] [--out JSON]

Prompts are held-out text (the bundled model's by default): --prompts chunks of --prompt-tokens tokens,
each continued greedily for --new-tokens tokens. Every speculative run's tokens are checked equal to the
plain run's (greedy is exact); a mismatch aborts the benchmark.

Projection: the plain run's routing (one step per token) and the speculative run's verify passes (one
step per pass: the union of the routed experts of its g+1 positions) are replayed through the real cache
and policy on the simulator's link with Mixtral-8x7B's per-layer costs on a hardware profile, scaled from
the traced model's layers to Mixtral's like `moe-offload simulate`. A pass costs one step (attention and
the GEMM of each distinct expert are memory-bound at g+1 <= 5 tokens) plus the drafting: per draft token,
the exit layer's share of attention and top-k resident experts, and the LM head. Assumed, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_offload import runtime
from moe_offload.analysis.bench import model_config
from moe_offload.analysis.sim import StepCosts, get_hardware, run_timeline
from moe_offload.model.observers import Observer, observing

from _paths import shown
from moe_offload.options import OffloadConfig


class PassRecorder(Observer):
    """Per forward pass after the prefill: the routed expert ids of every layer (all positions)."""

    def __init__(self, num_layers: int):
        self.L, self.passes, self._cur = num_layers, [], None

    def on_step(self, input_ids, start_pos, host_ids):
        self._cur = None if start_pos == 0 else [None] * self.L
        if self._cur is not None:
            self.passes.append(self._cur)

    def on_routing(self, layer, ids, weights, logits, start_pos):
        if self._cur is not None:
            self._cur[layer] = ids.reshape(-1).cpu().numpy().copy()  # [T*k]


def heldout_prompts(om, path: Path, n: int, tokens: int) -> list[list[int]]:
    ids = om.encode_text(path.read_text(encoding="utf-8"))
    stride = max(tokens, len(ids) // n)
    return [ids[i * stride: i * stride + tokens] for i in range(n) if len(ids) >= i * stride + tokens]


def padded(passes: list[list[np.ndarray]]) -> np.ndarray:
    """Ragged passes -> [P, L, K] padding each layer's ids with its own first id (a repeat is no new use)."""
    K = max(len(ids) for p in passes for ids in p)
    out = np.empty((len(passes), len(passes[0]), K), dtype=np.int64)
    for i, p in enumerate(passes):
        for l, ids in enumerate(p):
            out[i, l] = np.concatenate([ids, np.full(K - len(ids), ids[0])])
    return out


def resident_speed(model: str, acc: str, prompts, new: int, draft: int) -> dict:
    plain = runtime.load(model, device="cpu", offload=False)
    spec = runtime.load(model, device="cpu", offload=False, config=OffloadConfig.make(speculative=True, accelerator=acc, draft_tokens=draft))
    rows = {"plain": [0, 0.0], "spec": [0, 0.0]}
    acc_n, reach_n, steps, accepted = np.zeros(draft), np.zeros(draft), 0, 0
    for p in prompts:
        a = plain.generate(p, max_new_tokens=new)
        b = spec.generate(p, max_new_tokens=new)
        if a.token_ids != b.token_ids:
            sys.exit(f"speculative tokens differ from plain on prompt {p[:8]}...: exactness is broken")
        for key, r in (("plain", a), ("spec", b)):
            rows[key][0] += r.stats["decode_tokens"]
            rows[key][1] += r.stats["decode_seconds"]
        st = b.stats
        reach = np.array(st["reached_per_position"] + [0] * draft)[:draft]
        rate = np.array(st["acceptance_per_position"] + [0.0] * draft)[:draft]
        acc_n += np.round(rate * reach)
        reach_n += reach
        steps += st["spec_steps"]
        accepted += st["accepted_tokens"]
    tps = {k: v[0] / v[1] for k, v in rows.items()}
    return {"plain_decode_tok_s": tps["plain"], "spec_decode_tok_s": tps["spec"],
            "speedup": tps["spec"] / tps["plain"],
            "acceptance_per_position": (acc_n / np.maximum(reach_n, 1)).round(4).tolist(),
            "reached_per_position": reach_n.astype(int).tolist(),
            "tokens_per_verify": (accepted + steps) / steps if steps else 0.0,
            "draft_exit_layer": spec.speculative.drafter.head.exit_layer}


def offloaded_bytes(model: str, acc: str, prompts, new: int, draft: int, cap: int, policy: str,
                    predictor: str) -> dict:
    out = {}
    for mode in ("plain", "spec", "spec_all"):
        kw = dict(speculative=True, accelerator=acc, draft_tokens=draft) if mode != "plain" else {}
        with runtime.load(model, config=OffloadConfig.make(device="cpu", cache_per_layer=cap, policy=policy,
                                                          predictor=predictor, **({"accelerator": acc} | kw))) as om:
            if mode == "spec_all":  # every drafted position verified: no verify budget
                om.speculative.budget = False
            rec = PassRecorder(om.config.num_hidden_layers)
            toks = nbytes = drafts = 0
            with observing(om.model, rec):
                for p in prompts:
                    r = om.generate(p, max_new_tokens=new)
                    toks += len(r.token_ids)
                    nbytes += r.stats["bytes_h2d"]
                    drafts += r.stats.get("draft_tokens", 0)
            out[mode] = {"bytes_per_token": nbytes / toks, "tokens": toks, "passes": rec.passes, "drafts": drafts,
                         "num_experts": om.config.num_local_experts}
    return out


def project(plain_passes, spec_passes, tokens: int, E: int, Lt: int, exit_layer: int, draft_tokens: int,
            cap: int, policy: str, hw_name: str, fmt: str) -> dict:
    cfg = model_config("mixtral-8x7b")
    hw = get_hardware(hw_name)
    costs = StepCosts.for_model(cfg, hw, fmt)
    scale = cfg.num_hidden_layers / Lt
    k = cfg.num_experts_per_tok
    res = {}
    for mode, passes in (("plain", plain_passes), ("spec", spec_passes)):  # spec: either speculative run
        tl = run_timeline(padded(passes), E, cap * Lt, policy, costs)
        seconds = (tl.seconds - costs.head * tl.tokens) * scale + costs.head * tl.tokens
        if mode == "spec":  # drafting: exit layers' attention + k resident experts, and the head, per draft
            seconds += draft_tokens * (exit_layer * scale * (costs.attention + k * costs.expert) + costs.head)
        res[mode] = {"tokens_per_second": tokens / seconds, "hit_rate": tl.stats["hit_rate"],
                     "misses_per_token": tl.stats["misses"] * scale / tokens}
    res["speedup"] = res["spec"]["tokens_per_second"] / res["plain"]["tokens_per_second"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(runtime.bundled_model_path()))
    ap.add_argument("--accelerator", default=str(runtime.bundled_accelerator_path()))
    ap.add_argument("--heldout", default=str(runtime.bundled_heldout_text()))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--capacities", default="2,4,6", help="slots per layer")
    ap.add_argument("--policy", default="lru-layer")
    ap.add_argument("--predictors", default="none,auto", help="prefetch predictors to run the cache with")
    ap.add_argument("--hardware", default="rtx4090-pcie4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = runtime.load(args.model, device="cpu", offload=False)
    prompts = heldout_prompts(probe, Path(args.heldout), args.prompts, args.prompt_tokens)
    Lt = probe.config.num_hidden_layers
    result = {"model": shown(args.model), "accelerator": shown(args.accelerator), "prompts": len(prompts),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "max_draft_tokens": args.draft_tokens, "policy": args.policy, "threads": args.threads,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["resident"] = resident_speed(args.model, args.accelerator, prompts, args.new_tokens, args.draft_tokens)
    print(json.dumps(result["resident"], indent=1))
    result["offloaded"] = {}
    for pred in args.predictors.split(","):
        for cap in (int(c) for c in args.capacities.split(",")):
            r = offloaded_bytes(args.model, args.accelerator, prompts, args.new_tokens, args.draft_tokens, cap,
                                args.policy, pred)
            row = {m: {"bytes_per_token": r[m]["bytes_per_token"]} for m in ("plain", "spec", "spec_all")}
            row["plain_over_spec"] = r["plain"]["bytes_per_token"] / r["spec"]["bytes_per_token"]
            row["plain_over_spec_all"] = r["plain"]["bytes_per_token"] / r["spec_all"]["bytes_per_token"]
            if pred == "none":  # the projection replays demand loads only
                row["projection"] = {
                    f"{args.hardware}_{fmt}{suffix}": project(r["plain"]["passes"], r[m]["passes"], r[m]["tokens"],
                                                              r["plain"]["num_experts"], Lt,
                                                              result["resident"]["draft_exit_layer"], r[m]["drafts"],
                                                              cap, args.policy, args.hardware, fmt)
                    for fmt in ("bf16", "int4") for m, suffix in (("spec", ""), ("spec_all", "_no_budget"))}
            result["offloaded"][f"{pred}/{cap}"] = row
            print(f"predictor {pred}, {cap} slots/layer: bytes/token plain {row['plain']['bytes_per_token'] / 1e6:.3f} MB, "
                  f"spec {row['spec']['bytes_per_token'] / 1e6:.3f} MB (plain/spec {row['plain_over_spec']:.2f}x; "
                  f"without the verify budget {row['spec_all']['bytes_per_token'] / 1e6:.3f} MB, "
                  f"{row['plain_over_spec_all']:.2f}x)"
                  + "".join(f"; {k}: {v['plain']['tokens_per_second']:.2f} -> {v['spec']['tokens_per_second']:.2f} tok/s"
                            for k, v in row.get("projection", {}).items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
