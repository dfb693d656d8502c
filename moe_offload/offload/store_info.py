"""What the host expert store holds, from a checkpoint's headers (`moe-offload info --json`'s
expert_store) or from a loaded store (OffloadedModel.store_info): one function for both."""

from __future__ import annotations

from typing import Any

import torch


def expert_store_info(ckpt: Any, store: Any = None) -> dict[str, Any]:
    """The host expert store of a checkpoint: its format, one expert's bytes (the largest layer's), the
    store's bytes, whether it reads the file's memory map (`mapped`: a GGUF file; a safetensors
    checkpoint whose expert bytes are the rows, read in place) and, where the checkpoint knows them (GGUF,
    safetensors), the files' expert bytes and the formats of every tensor group.
    Without `store` as load() would build it from the checkpoint's own format on the CPU (`info`: mapped
    says whether the store reads the files in place there; a CUDA run keeps a pinned copy of a safetensors
    checkpoint's experts that fit in RAM); with `store` (a HostExpertStore) as that store holds them
    (OffloadedModel.store_info)."""
    from ..formats import get_format
    from .store import reads_in_place

    cfg = ckpt.config
    if store is not None:
        name, one, host, mapped = store.format.name, store.expert_bytes, store.host_bytes, bool(store.mapped)
    else:
        fmt = ckpt.expert_format() if hasattr(ckpt, "expert_format") else get_format(cfg.expert_format,
                                                                                     cfg.expert_group_size)  # +biases
        H, I = cfg.hidden_size, cfg.intermediate_size
        per_layer = [f.expert_bytes(H, I) for f in fmt.per_layer(cfg.num_moe_layers)]
        name, one, host = fmt.name, fmt.expert_bytes(H, I), cfg.num_local_experts * sum(per_layer)
        dtype = getattr(torch, ckpt.dtype_name, torch.float32)  # the checkpoint's own (a float store's dtype)
        mapped = reads_in_place(ckpt, fmt, dtype)  # as HostExpertStore.from_checkpoint would on the CPU
    out: dict[str, Any] = {"format": name, "one_expert_bytes": one, "host_bytes": host, "mapped": mapped}
    if hasattr(ckpt, "tensor_groups"):  # GGUF, safetensors: what the files hold, per tensor group
        out["file_expert_bytes"] = ckpt.expert_file_bytes()
        out["tensor_groups"] = ckpt.tensor_groups()
    return out
