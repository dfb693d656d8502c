"""make_copy_engine: the copy engine for a device (transfer.py's engines and cuda_link's)."""

from __future__ import annotations

import torch

from .cuda_link import CudaLinkEngine
from .link import DEFAULT_CHUNK_BYTES
from .transfer import CopyFaults, ThreadCopyEngine

def make_copy_engine(device: torch.device, faults: CopyFaults | None = None,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """The copy engine for `device`: on cuda the demand-first chunked link (CudaLinkEngine), on cpu
    its thread twin (ThreadCopyEngine)."""
    if device.type != "cuda":
        return ThreadCopyEngine(faults, chunk_bytes)
    return CudaLinkEngine(device, faults, chunk_bytes)
