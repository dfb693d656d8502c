"""Packed experts without offload: every expert of every layer on the device in its layer's format's rows
(the same bytes the host store holds; on the cpu the store's rows themselves, or a GGUF file's memory
map), so a quantized resident run and a quantized offloaded run read identical bytes."""

from __future__ import annotations

import torch

from ..kernels import one_token_experts, run_experts
from .store import HostExpertStore


class PackedResidentExperts:
    """ExpertBackend with every expert packed on `device` ([L, E, row]): no offload.

    On cpu with the loop backend each layer's experts are prepared once for the CPU (the format's
    cpu_pool: PyTorch's weight-only ops for int8 / int4; `extra_bytes` is the host RAM that costs).
    cpu_op=False keeps dequantize-then-matmul, what the offloaded loop computes: the exactness
    reference (`reference()`)."""

    def __init__(self, store: HostExpertStore, device: torch.device, backend: str = "loop", cpu_op: bool = True):
        self.store, self.device = store, device
        L, E = store.num_layers, store.num_experts
        H, I = store.hidden, store.inter
        if torch.device(device).type == "cpu":  # the store's own rows (or the file's memory map): no copy
            pools = [store.layer_pool(layer) for layer in range(L)]
        else:  # each layer's rows [E, row] on the device, in that layer's format
            pools = [store.formats[layer].pool_views(store.layer_rows_on(layer, device), H, I) for layer in range(L)]
        if cpu_op and backend == "loop" and torch.device(device).type == "cpu":
            self.views = [(store.formats[layer].cpu_pool(pool, store.dtype), None) for layer, pool in enumerate(pools)]
        else:
            self.views = [pool.as_views() for pool in pools]
        self.extra_bytes = sum(v.extra_bytes for v, w2 in self.views if w2 is None)
        self.backend = backend
        self.identity_slots = torch.arange(E, dtype=torch.int32, device=device)
        self.prefetcher = None

    def reference(self) -> "PackedResidentExperts":
        """The same experts run by dequantize-then-matmul (what the offloaded loop backend computes)."""
        return PackedResidentExperts(self.store, self.device, self.backend, cpu_op=False)

    def one_token_experts(self, layer: int, h: torch.Tensor) -> tuple[bool, list] | None:
        """Layer `layer`'s experts as a compiled decode step runs them for one token h [1, H]
        (kernels.one_token_experts), or None."""
        if self.backend != "loop":
            return None
        w13, w2 = self.views[layer]
        return one_token_experts(h, w13, w2, self.store.num_experts)

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.views[layer]
        return run_experts(self.backend, h, ids, weights, w13, w2, self.identity_slots)


__all__ = ["PackedResidentExperts"]
