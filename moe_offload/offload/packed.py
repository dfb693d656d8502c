"""Quantized experts without offload, and the expert_dtype / group_size options of load().

`resolve_expert_format` checks the options; `PackedResidentExperts` holds every expert of every
layer packed on the device (the same bytes the host store holds), so a quantized resident run and a
quantized offloaded run dequantize identical bytes and agree token for token.
"""

from __future__ import annotations

import torch

from ..errors import MoeOffloadError
from ..kernels import run_experts
from ..kernels.quant_cpu import CpuQuantPool
from ..quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANT_FORMATS
from .store import HostExpertStore

EXPERT_DTYPES = ("auto", "bf16", "fp16", "int8", "int4")
QUANT_KERNELS = ("auto", "reference")
_FLOAT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_expert_format(expert_dtype: str, group_size: int, dtype: torch.dtype, backend: str) -> str | None:
    """'int8' / 'int4' for a quantized store, None for experts kept in the compute dtype."""
    if expert_dtype not in EXPERT_DTYPES:
        raise MoeOffloadError(f"expert_dtype {expert_dtype!r} is not one of {list(EXPERT_DTYPES)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise MoeOffloadError(f"group_size {group_size!r} is not one of {list(GROUP_SIZES)} (int4 groups along "
                              "the input dimension)")
    if expert_dtype in _FLOAT:
        if _FLOAT[expert_dtype] != dtype:
            raise MoeOffloadError(f"expert_dtype {expert_dtype!r} needs the compute dtype "
                                  f"{str(_FLOAT[expert_dtype]).removeprefix('torch.')} (dtype=...), got "
                                  f"{str(dtype).removeprefix('torch.')}; int8 / int4 run at any dtype")
        return None
    if expert_dtype in QUANT_FORMATS:
        if backend not in ("loop", "triton"):
            raise MoeOffloadError(f"expert_dtype {expert_dtype!r} runs on moe_backend 'loop' or 'triton' "
                                  f"(dequantized in-kernel); got moe_backend {backend!r}")
        return expert_dtype
    return None


class PackedResidentExperts:
    """ExpertBackend with every expert packed on `device` ([L, E, row] uint8): no offload, quantized.

    On cpu with the loop backend and quant_kernels 'auto', each layer's experts are prepared once for
    PyTorch's CPU weight-only ops (kernels.quant_cpu; `extra_bytes` is the host RAM that costs);
    'reference' dequantizes, then multiplies (the exact twin of an offloaded quantized run)."""

    def __init__(self, store: HostExpertStore, device: torch.device, backend: str = "loop",
                 quant_kernels: str = "auto"):
        if quant_kernels not in QUANT_KERNELS:
            raise MoeOffloadError(f"quant_kernels {quant_kernels!r} is not one of {list(QUANT_KERNELS)}")
        L, E = store.num_layers, store.num_experts
        self.rows = store.buffer.to(device).view(L, E, -1)  # [L, E, B]
        self.views = [store.pool_views(self.rows[layer]) for layer in range(L)]
        if quant_kernels == "auto" and backend == "loop" and self.rows.device.type == "cpu":
            self.views = [(CpuQuantPool(w13, store.dtype), None) for w13, _ in self.views]
        self.extra_bytes = sum(v.extra_bytes for v, _ in self.views if isinstance(v, CpuQuantPool))
        self.backend = backend
        self.identity_slots = torch.arange(E, dtype=torch.int32, device=device)
        self.prefetcher = None

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.views[layer]
        return run_experts(self.backend, h, ids, weights, w13, w2, self.identity_slots)


__all__ = ["DEFAULT_GROUP_SIZE", "EXPERT_DTYPES", "PackedResidentExperts", "QUANT_KERNELS", "resolve_expert_format"]
