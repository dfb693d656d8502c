"""Packed experts without offload: every expert of every layer on the device in its format's rows
(the same bytes the host store holds), so a quantized resident run and a quantized offloaded run read
identical bytes."""

from __future__ import annotations

import torch

from ..kernels import run_experts
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
        fmt, H, I = store.format, store.hidden, store.inter
        self.rows = store.buffer.to(device).view(L, E, -1)  # [L, E, row]
        pools = [fmt.pool_views(self.rows[layer], H, I) for layer in range(L)]
        if cpu_op and backend == "loop" and self.rows.device.type == "cpu":
            self.views = [(fmt.cpu_pool(pool, store.dtype), None) for pool in pools]
        else:
            self.views = [pool.as_views() for pool in pools]
        self.extra_bytes = sum(v.extra_bytes for v, w2 in self.views if w2 is None)
        self.backend = backend
        self.identity_slots = torch.arange(E, dtype=torch.int32, device=device)
        self.prefetcher = None

    def reference(self) -> "PackedResidentExperts":
        """The same experts run by dequantize-then-matmul (what the offloaded loop backend computes)."""
        return PackedResidentExperts(self.store, self.device, self.backend, cpu_op=False)

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.views[layer]
        return run_experts(self.backend, h, ids, weights, w13, w2, self.identity_slots)


__all__ = ["PackedResidentExperts"]
