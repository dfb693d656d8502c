"""Packed experts without offload: every expert of every layer on the device in its format's rows
(the same bytes the host store holds), so a quantized resident run and a quantized offloaded run read
identical bytes.

`resolve_expert_format` is the string form of formats.choose_format, kept for runtime.py until it
holds the format object itself.
"""

from __future__ import annotations

import torch

from ..errors import MoeOffloadError
from ..formats import DEFAULT_GROUP_SIZE, EXPERT_DTYPES, choose_format
from ..kernels import run_experts
from .store import HostExpertStore

QUANT_KERNELS = ("auto", "reference")


def resolve_expert_format(expert_dtype: str, group_size: int, dtype: torch.dtype, backend: str) -> str | None:
    """The packed format's name ('int8' / 'int4'), or None for experts kept in the compute dtype."""
    fmt = choose_format(expert_dtype, group_size, dtype, backend)
    return fmt.name if fmt.quantized else None


class PackedResidentExperts:
    """ExpertBackend with every expert packed on `device` ([L, E, row]): no offload.

    On cpu with the loop backend each layer's experts are prepared once for the CPU (the format's
    cpu_pool: PyTorch's weight-only ops for int8 / int4; `extra_bytes` is the host RAM that costs).
    `quant_kernels` 'reference' (being retired) keeps dequantize-then-matmul instead."""

    def __init__(self, store: HostExpertStore, device: torch.device, backend: str = "loop",
                 quant_kernels: str = "auto"):
        if quant_kernels not in QUANT_KERNELS:
            raise MoeOffloadError(f"quant_kernels {quant_kernels!r} is not one of {list(QUANT_KERNELS)}")
        L, E = store.num_layers, store.num_experts
        fmt, H, I = store.format, store.hidden, store.inter
        self.rows = store.buffer.to(device).view(L, E, -1)  # [L, E, row]
        pools = [fmt.pool_views(self.rows[layer], H, I) for layer in range(L)]
        if quant_kernels == "auto" and backend == "loop" and self.rows.device.type == "cpu":
            self.views = [(fmt.cpu_pool(pool, store.dtype), None) for pool in pools]
        else:
            self.views = [pool.as_views() for pool in pools]
        self.extra_bytes = sum(v.extra_bytes for v, w2 in self.views if w2 is None)
        self.backend = backend
        self.identity_slots = torch.arange(E, dtype=torch.int32, device=device)
        self.prefetcher = None

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.views[layer]
        return run_experts(self.backend, h, ids, weights, w13, w2, self.identity_slots)


__all__ = ["DEFAULT_GROUP_SIZE", "EXPERT_DTYPES", "PackedResidentExperts", "QUANT_KERNELS", "resolve_expert_format"]
