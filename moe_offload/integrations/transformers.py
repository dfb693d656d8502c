"""Offload the routed experts of a loaded transformers MoE model into moe_offload's expert cache.

    from moe_offload.integrations.transformers import offload
    model = AutoModelForCausalLM.from_pretrained(...)          # Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
    handle = offload(model, cache_per_layer=4, policy="lru")   # experts now live in host RAM
    model.generate(...)                                         # transformers' own generate, offloaded
    handle.stats()  (or model.moe_offload.stats())              # hits, misses, bytes copied, ...

Each decoder layer's `experts` module (transformers 5: fused `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]; transformers 4: a ModuleList of w1/w3/w2 or gate/up/down projections) is
copied into a HostExpertStore and replaced in place by a `CachedExperts` module with the same call
signature, (hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]. The model's own
router, shared experts (Qwen2-MoE) and everything else stay untouched, so family-specific routing
(renormalised or not) is whatever the model computes. The original expert parameters are freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import resolve_device
from ..errors import MoeOffloadError
from ..offload import ExpertCache, HostExpertStore, OffloadedExperts, make_copy_engine, make_policy
from ..validate import choice, integer

SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")


class CachedExperts(nn.Module):
    """Drop-in for a transformers experts module: the same call, the experts from the slot cache."""

    def __init__(self, layer: int, experts: OffloadedExperts, num_experts: int):
        super().__init__()
        self.layer, self.backend, self.num_experts = layer, experts, num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = self.backend(self.layer, hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype))
        return out.to(hidden_states.dtype)  # [N, H]


@dataclass
class OffloadHandle:
    """What `offload` returns (also set as `hf_model.moe_offload`): the cache and its statistics."""

    cache: ExpertCache
    experts: OffloadedExperts
    num_layers: int
    num_experts: int

    def stats(self) -> dict[str, Any]:
        """Expert-cache counters since the last `reset_stats()`: uses, hits, misses, bytes_h2d, ..."""
        self.cache.drain_stalls()
        return {**self.cache.stats.to_dict(), "capacity_slots": self.cache.num_slots,
                "policy": self.cache.policy.name}

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    def close(self) -> None:
        """Stop the copy engine (its thread on CPU). The model cannot run afterwards."""
        self.cache.close()


def _blocks(hf_model: nn.Module) -> list[nn.Module]:
    name = type(hf_model).__name__
    if name not in SUPPORTED:
        raise MoeOffloadError(f"offload: {name} is not supported; supported: {', '.join(SUPPORTED)}")
    blocks = []
    for i, layer in enumerate(hf_model.model.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if block is None or not hasattr(block, "experts"):
            raise MoeOffloadError(f"offload: layer {i} of {name} has no routed experts (dense MLP layers are "
                                  "not supported)")
        blocks.append(block)
    return blocks


def _expert(experts: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1 gate [I, H], w3 up [I, H], w2 down [H, I]) of expert e, from either transformers layout."""
    if isinstance(experts, CachedExperts):
        raise MoeOffloadError("offload: this model's experts are offloaded already")
    if hasattr(experts, "gate_up_proj"):  # transformers 5: gate rows first, then up rows
        w1, w3 = experts.gate_up_proj[e].chunk(2, dim=0)
        return w1, w3, experts.down_proj[e]
    ex = experts[e]
    if hasattr(ex, "w1"):
        return ex.w1.weight, ex.w3.weight, ex.w2.weight
    return ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight


def offload(hf_model: nn.Module, *, cache_per_layer: int | None = None, cache_experts: int | None = None,
            policy: str = "lru", device: str | torch.device | None = None, moe_backend: str = "loop"
            ) -> OffloadHandle:
    """Move the routed experts of `hf_model` into host RAM and a device slot cache, in place.

    cache_per_layer / cache_experts: slots per layer (times the layers) or in total (give at most one;
    default: half the experts of a layer, at least top_k, per layer). policy: lru, lru-layer, lfu or
    predictive. device: where the slots live (default: the model's device). moe_backend: loop (any
    device) or triton (CUDA). Returns an OffloadHandle, also set as `hf_model.moe_offload`.
    """
    blocks = _blocks(hf_model)
    policy = choice("policy", policy, ("lru", "lru-layer", "lfu", "predictive"))
    moe_backend = choice("moe_backend", moe_backend, ("loop", "triton"))
    cfg = hf_model.config
    L, E = len(blocks), _num_experts(cfg)
    top_k = int(cfg.num_experts_per_tok)
    if cache_per_layer is not None and cache_experts is not None:
        raise MoeOffloadError("offload: give at most one of cache_per_layer and cache_experts")
    if cache_experts is not None:
        slots = integer("cache_experts", cache_experts, top_k, L * E)
    else:
        per_layer = max(top_k, E // 2) if cache_per_layer is None else integer("cache_per_layer", cache_per_layer,
                                                                             top_k, E)
        slots = per_layer * L
    first = blocks[0].experts
    w1, _, w2 = _expert(first, 0)
    H, I, dtype = w1.shape[1], w1.shape[0], w1.dtype
    dev = resolve_device(device) if device is not None else w1.device  # a bad name: one MoeOffloadError line
    store = HostExpertStore(L, E, H, I, dtype, pin=dev.type == "cuda")
    with torch.no_grad():
        for l, block in enumerate(blocks):
            for e in range(E):
                store.put(l, e, *(w.detach().to("cpu") for w in _expert(block.experts, e)))
    cache = ExpertCache(store, slots, make_policy(policy), dev, make_copy_engine(dev))
    backend = OffloadedExperts(cache, moe_backend)
    for l, block in enumerate(blocks):
        block.experts = CachedExperts(l, backend, E)  # the old parameters are freed with the module
    handle = OffloadHandle(cache, backend, L, E)
    hf_model.moe_offload = handle
    return handle


def _num_experts(cfg: Any) -> int:
    for name in ("num_local_experts", "num_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise MoeOffloadError(f"offload: {type(cfg).__name__} has neither num_local_experts nor num_experts")
