#!/usr/bin/env python
"""Real decode tokens/s of a Mixtral-shaped model with offloaded experts, on a GPU.

Random weights at Mixtral-8x7B dimensions (H=4096, I=14336, E=8, k=2, GQA 32/8) for as many layers as the
routing trace has (the bundled model's trace: 6 layers, 48 experts = 17 GB of bf16 experts in pinned host
RAM). Routing is forced from the trace (model.observers.ForcedRouting) and predictions replayed from
it, so policies and predictors see the bundled model's real routing. Measures tokens/s all-resident vs
offloaded (capacities x policies x predictors), copy GB/s, and per-layer attention / expert times (CUDA
events) for calibrating `moe-offload simulate`. Writes JSON.

    python benchmarks/decode.py [--trace FILE] [--tokens 48]        # GPU, about 3-4 minutes on an H100
    python benchmarks/decode.py --smoke                                # tiny shapes on CPU: checks the script
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import moe_offload
from moe_offload.config import ModelConfig
from moe_offload.offload import ExpertCache, HostExpertStore, OffloadedExperts, make_copy_engine, make_policy
from moe_offload.offload.prefetch import Prefetcher
from moe_offload.model.observers import ForcedRouting
from moe_offload.model.transformer import KVCache, MoeModel, empty_resident_experts, init_random_
from moe_offload.results import result_metadata, write_json_atomic
from moe_offload.analysis.sim import RecordedPredictor
from moe_offload.analysis.trace import RoutingTrace, load_trace, record_with_predictions


def bundled_trace(tokens: int) -> RoutingTrace:
    m = moe_offload.load(device="cpu", offload=False)
    ids = m.encode_text(moe_offload.bundled_heldout_text().read_text())[:tokens]
    acc_file = moe_offload.runtime.bundled_accelerator_path()
    return record_with_predictions(m.model, ids, m.runtime.max_seq_len, 2, acc_file if acc_file.is_file() else None)


def build(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, experts) -> MoeModel:
    model = MoeModel(cfg, experts, dtype=dtype, device=device, max_seq_len=cfg.max_position_embeddings)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode(model: MoeModel, trace: RoutingTrace, tokens: int, device: torch.device) -> float:
    """Decode `tokens` steps (teacher-forced token ids, forced routing); returns tokens/s."""
    cache = KVCache(model.cfg, 1, tokens + 1, model.dtype, device)
    x = torch.empty(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        x.fill_(int(trace.token_ids[0]))
        model(x, 0, cache)  # warm-up step (not timed)
        sync(device)
        t0 = time.perf_counter()
        for p in range(1, tokens):
            tok = int(trace.token_ids[p])
            x.fill_(tok)
            model(x, p, cache, host_ids=(tok,))
        sync(device)
    return (tokens - 1) / (time.perf_counter() - t0)


def per_layer_times(model: MoeModel, device: torch.device) -> dict:
    """Median ms of one layer's attention and of one routed expert at batch 1 (CUDA events)."""
    if device.type != "cuda":
        return {}
    from moe_offload.kernels import expert_ffn

    h = torch.randn(1, 1, model.cfg.hidden_size, device=device, dtype=model.dtype)
    cache = KVCache(model.cfg, 1, 64, model.dtype, device)
    w13, w2 = (torch.randn(2 * model.cfg.intermediate_size, model.cfg.hidden_size, device=device, dtype=model.dtype),
               torch.randn(model.cfg.hidden_size, model.cfg.intermediate_size, device=device, dtype=model.dtype))

    def timed(fn) -> float:
        out = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        return float(np.median(out[5:]))

    with torch.inference_mode():
        return {"attention_ms": timed(lambda: model._attention(h, 0, 32, cache)),
                "expert_ms": timed(lambda: expert_ffn(h[0], w13, w2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help="routing trace .npz (default: record one on the bundled model)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("benchmarks/decode.py needs a GPU (or --smoke on CPU)")
    trace = load_trace(args.trace) if args.trace else bundled_trace(args.tokens + 1)
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2]
    h, inter, heads, kv = (64, 96, 4, 2) if args.smoke else (4096, 14336, 32, 8)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cfg = ModelConfig(vocab_size=32000 if not args.smoke else 4096, hidden_size=h, intermediate_size=inter,
                        num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv, num_local_experts=E,
                        num_experts_per_tok=k, head_dim=h // heads, max_position_embeddings=args.tokens + 1)
    tokens = min(args.tokens, T)
    forced = ForcedRouting(torch.as_tensor(trace.routed_ids.astype(np.int64), device=device),
                           torch.as_tensor(trace.routed_weights, device=device))
    t0 = time.perf_counter()
    store = HostExpertStore(L, E, h, inter, dtype, pin=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    for i in range(L * E):  # random experts, filled in chunks to keep host memory flat
        store.buffer[i].normal_(0, 0.02, generator=g)
    build_s = time.perf_counter() - t0
    results = {"settings": {"layers": L, "experts": E, "top_k": k, "hidden": h, "inter": inter, "dtype": str(dtype),
                            "tokens": tokens, "expert_bytes": store.expert_bytes, "store_build_seconds": build_s},
               "runs": []}

    resident = empty_resident_experts(cfg, dtype, device)
    with torch.no_grad():
        for l in range(L):
            for e in range(E):
                resident.w13[l, e].copy_(store.w13(l, e))
                resident.w2[l, e].copy_(store.w2(l, e))
    model = build(cfg, device, dtype, resident)
    model.observers.append(forced)
    base = decode(model, trace, tokens, device)
    results["all_resident_tokens_per_second"] = base
    results["per_layer_times"] = per_layer_times(model, device)
    print(f"all resident: {base:.2f} tok/s  {results['per_layer_times']}", flush=True)
    dense_state = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("experts.")}
    del resident, model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    backend = "triton" if device.type == "cuda" else "loop"
    configs = [(c, pol, pred) for c in (2, 4) for pol in ("lru", "lfu") for pred in ("none", "next-gate", "oracle")]
    configs += [(c, "predictive", "m2r2") for c in (2, 4) if trace.preds and "m2r2" in trace.preds]
    from moe_offload.analysis.bench import predictor_from_trace

    for per_layer, policy, pred in configs:
        cache = ExpertCache(store, per_layer * L, make_policy(policy), device, make_copy_engine(device))
        experts = OffloadedExperts(cache, backend)
        model = build(cfg, device, dtype, experts)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(dense_state[n])
        model.observers.append(forced)
        rp = predictor_from_trace(trace, pred, 2)
        if rp is not None:
            experts.prefetcher = Prefetcher(cache, rp, L, k)
            model.observers.append(experts.prefetcher)
        tps = decode(model, trace, tokens, device)
        st = cache.stats.to_dict()
        row = {"capacity_per_layer": per_layer, "policy": policy, "predictor": pred, "tokens_per_second": tps,
               "hit_rate": st["hit_rate"], "misses_per_token": st["misses"] / tokens,
               "stall_seconds_per_token": st["stall_seconds"] / tokens,
               "copy_gbps_effective": st["bytes_h2d"] / max(st["stall_seconds"], 1e-9) / 1e9 if st["stall_seconds"] else None,
               "speed_vs_resident": tps / base}
        results["runs"].append(row)
        print(f"{per_layer}/layer {policy:10s} {pred:9s} {tps:7.2f} tok/s  hit {st['hit_rate']:.3f}  "
              f"misses/token {row['misses_per_token']:.2f}", flush=True)
        cache.engine.close()
        del model, experts, cache
    out = args.out or os.path.join(os.environ.get("OUT") or "benchmarks/results", "decode.json")
    print(f"wrote {write_json_atomic(out, {**result_metadata(device), **results})}")


if __name__ == "__main__":
    main()
