"""make_copy_engine: the copy engine for a device (transfer.py's engines and cuda_link's)."""

from __future__ import annotations

import torch

from .cuda_link import CudaLinkEngine
from .link import DEFAULT_CHUNK_BYTES
from .transfer import CopyFaults, CudaCopyEngine, ThreadCopyEngine

WHOLE = 1 << 62  # a chunk no expert reaches: whole-expert copies


def make_copy_engine(device: torch.device, faults: CopyFaults | None = None,
                     chunk_bytes: int | None = DEFAULT_CHUNK_BYTES):
    """The copy engine for `device`: on cuda the demand-first chunked link (CudaLinkEngine), or with
    chunk_bytes None the FIFO CudaCopyEngine; on cpu the ThreadCopyEngine (None: whole experts)."""
    if device.type != "cuda":
        return ThreadCopyEngine(faults, chunk_bytes or WHOLE)
    if chunk_bytes is None:
        return CudaCopyEngine(device, faults)
    return CudaLinkEngine(device, faults, chunk_bytes)
