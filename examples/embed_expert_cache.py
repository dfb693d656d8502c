#!/usr/bin/env python
"""Embed moe_offload's expert cache in another runtime: here, Hugging Face transformers' Mixtral.

The building blocks an embedder needs are four objects:
    HostExpertStore   every expert packed in host RAM (pinned on CUDA), one row per expert
    ExpertCache       a fixed pool of device slots + residency table + eviction policy + stats
    copy engine       make_copy_engine(device): CUDA copy stream, or a thread on CPU
    OffloadedExperts  experts(layer, h [N, H], topk_ids [N, k], topk_weights [N, k]) -> [N, H]

This script builds a small random transformers MixtralForCausalLM, moves its experts into a store,
frees them from the model, and replaces each layer's sparse-MoE block by a thin module that keeps the
model's own router and sends the expert computation through the cache. The logits must not change.

    python examples/embed_expert_cache.py [--slots 5] [--policy lru] [--device cpu] [--integration]

--integration does the same in one call: moe_offload.integrations.transformers.offload(model, ...),
which keeps the model's whole MoE block (router included) and replaces only its experts module.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from transformers import MixtralConfig, MixtralForCausalLM

from moe_offload.offload import (ExpertCache, HostExpertStore, OffloadedExperts, make_copy_engine,
                                 make_policy)
from moe_offload.integrations.transformers import offload
from moe_offload.model import route


def expert_weights(block: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) of expert e of a transformers Mixtral MoE block (v5 fused or v4 per-expert layout)."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):  # transformers 5: [E, 2I, H] (gate rows, then up rows), [E, H, I]
        w1, w3 = experts.gate_up_proj[e].chunk(2, dim=0)
        return w1, w3, experts.down_proj[e]
    ex = experts[e]  # transformers 4: one module per expert
    return ex.w1.weight, ex.w3.weight, ex.w2.weight


class CachedMoeBlock(nn.Module):
    """Drop-in for a Mixtral sparse-MoE block: the model's router, experts from the cache."""

    def __init__(self, gate_weight: torch.Tensor, top_k: int, layer: int, experts: OffloadedExperts):
        super().__init__()
        self.gate_weight, self.top_k, self.layer, self.experts = gate_weight, top_k, layer, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])  # [N, H]
        weights, ids = route(h @ self.gate_weight.t(), self.top_k)  # [N, k] each
        return self.experts(self.layer, h, ids, weights).reshape(shape)


def embed_by_hand(model: nn.Module, cfg: MixtralConfig, slots: int, policy: str,
                  device: torch.device) -> ExpertCache:
    """The four building blocks wired by hand: store, cache, copy engine, OffloadedExperts."""
    blocks = [getattr(layer, "mlp", None) or layer.block_sparse_moe for layer in model.model.layers]
    store = HostExpertStore(len(blocks), cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                            torch.float32, pin=device.type == "cuda")
    with torch.no_grad():
        for l, block in enumerate(blocks):
            for e in range(cfg.num_local_experts):
                store.put(l, e, *(w.cpu() for w in expert_weights(block, e)))
    cache = ExpertCache(store, slots, make_policy(policy), device, make_copy_engine(device))
    experts = OffloadedExperts(cache, backend="loop")
    for l, layer in enumerate(model.model.layers):
        name = "mlp" if hasattr(layer, "mlp") else "block_sparse_moe"
        gate = blocks[l].gate.weight.detach()
        setattr(layer, name, CachedMoeBlock(gate, cfg.num_experts_per_tok, l, experts))
    return cache  # the model no longer holds any expert weight: only the store does


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=5, help="device expert slots (of 3 layers x 8 experts)")
    ap.add_argument("--policy", default="lru", choices=["lru", "lru-layer", "lfu", "predictive"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--integration", action="store_true",
                    help="use moe_offload.integrations.transformers.offload instead of the hand wiring")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=64, experts_implementation="eager")
    model = MixtralForCausalLM(cfg).eval().to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, 24), device=device)
    with torch.no_grad():
        reference = model(ids).logits

    # --integration: the one-call form; otherwise the building blocks wired by hand (embed_by_hand)
    if args.integration:
        cache = offload(model, cache_experts=args.slots, policy=args.policy, device=device).cache
    else:
        cache = embed_by_hand(model, cfg, args.slots, args.policy, device)
    with torch.no_grad():
        offloaded = model(ids).logits
    err = ((offloaded - reference).abs().max() / reference.abs().max()).item()
    cache.stats.check()
    st = cache.stats.to_dict()
    print(f"transformers Mixtral with experts behind a {args.slots}-slot {args.policy} cache on {device}: "
          f"max relative logit difference {err:.2e}")
    print(f"uses {st['uses']}  hits {st['hits']}  misses {st['misses']}  bytes copied {st['bytes_h2d']:,}  "
          f"stall {st['stall_seconds'] * 1e3:.2f} ms")
    if err > 1e-5:
        raise SystemExit(f"offloaded logits differ from the original model's: {err:.2e}")


if __name__ == "__main__":
    main()
