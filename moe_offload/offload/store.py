"""Host tier (protocols.ExpertStore): every expert (w1, w3, w2) packed contiguously inside one large (pinned) host allocation."""

from __future__ import annotations

from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, expert_name
from ..errors import MoeOffloadError
from ..formats import DEFAULT_GROUP_SIZE, ExpertFormat, float_format, get_format
from ..quant.ckpt import read_packed_expert

# Leave this much RAM to the rest of the machine when checking that the store fits.
HOST_RAM_MARGIN = 1 << 30


def available_host_bytes() -> int:
    """Host RAM that can be allocated without swapping (psutil's `available`)."""
    return int(psutil.virtual_memory().available)


def check_host_ram(needed: int, what: str) -> None:
    avail = available_host_bytes()
    if needed > avail - HOST_RAM_MARGIN:
        raise MoeOffloadError(
            f"host RAM too small for {what}: needs {needed:,} bytes ({needed / 1e9:.2f} GB), "
            f"{avail:,} bytes ({avail / 1e9:.2f} GB) available and {HOST_RAM_MARGIN / 1e9:.2f} GB kept free; "
            "use a smaller expert dtype or a machine with more RAM")


def as_format(fmt: ExpertFormat | str | None, group_size: int, dtype: torch.dtype) -> ExpertFormat:
    """An expert format given as an object, a name, or None (experts in the compute dtype `dtype`)."""
    if isinstance(fmt, ExpertFormat):
        return fmt
    return float_format(dtype) if fmt is None else get_format(fmt, group_size, dtype)


class HostExpertStore:
    """All experts of a model in host memory, one contiguous row per expert (layout: the expert format's;
    [w1 | w3 | w2] flattened for float experts, packed sections for int8 / int4).

    `row(layer, e)` is one expert, so one host-to-device copy moves it. The buffer is pinned when
    `pin` is True (CUDA runs), so copies can run asynchronously on a copy stream. `format` (an
    ExpertFormat, moe_offload.formats; `fmt` as a name or None: the compute dtype `dtype`) packs experts
    as they are put and gives the views the kernels read (`pool_views`).
    """

    def __init__(self, num_layers: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 pin: bool = False, fmt: ExpertFormat | str | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.format = as_format(fmt, group_size, dtype)
        self.expert_bytes = self.format.expert_bytes(hidden, inter)
        self.expert_elems = self.format.row_length(hidden, inter)
        check_host_ram(num_layers * num_experts * self.expert_bytes, "the host expert store")
        self.buffer = torch.empty(num_layers * num_experts, self.expert_elems, dtype=self.format.row_dtype,
                                  pin_memory=pin)
        self.pinned = pin

    def row(self, layer: int, e: int) -> torch.Tensor:
        """Expert (layer, e) as one contiguous row."""
        return self.buffer[layer * self.num_experts + e]

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """An uninitialised device pool [S, row] in the store's row dtype."""
        return torch.empty(num_slots, self.expert_elems, dtype=self.buffer.dtype, device=device)

    def pool_views(self, pool: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """(w13, w2) of a pool [S, row] (rows laid out as in the store) as the kernels take them: float
        views [S, 2I, H] and [S, H, I], or (the format's WeightPool, None) for a packed format."""
        return self.format.pool_views(pool, self.hidden, self.inter).as_views()

    def cpu_expert(self, layer: int, e: int) -> Any:
        """Expert (layer, e) prepared to run on the host in the compute dtype: an object whose ffn(0, x)
        runs it (the format's CPU op where it has one) and whose extra_bytes is the RAM that costs."""
        pool = self.format.pool_views(self.row(layer, e)[None], self.hidden, self.inter)
        return self.format.cpu_pool(pool, self.dtype)

    def w13(self, layer: int, e: int) -> torch.Tensor:
        """Float stores: expert (layer, e)'s w13 [2I, H] (a view of its row)."""
        return self.row(layer, e)[: 2 * self.inter * self.hidden].view(2 * self.inter, self.hidden)

    def w2(self, layer: int, e: int) -> torch.Tensor:
        """Float stores: expert (layer, e)'s w2 [H, I] (a view of its row)."""
        return self.row(layer, e)[2 * self.inter * self.hidden:].view(self.hidden, self.inter)

    def put(self, layer: int, e: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Store one expert from its three matrices (w1, w3: [I, H]; w2: [H, I]), packed by the format."""
        self.format.put(self.row(layer, e), w1, w3, w2, self.hidden, self.inter)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype, pin: bool = False,
                        show_progress: bool = False, fmt: ExpertFormat | str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE) -> "HostExpertStore":
        """Fill the store straight from the checkpoint's memory map, one expert at a time (quantized
        on the way in for a packed format: only one expert is ever held unquantized)."""
        cfg = ckpt.config
        fmt = as_format(fmt, group_size, dtype)
        group_size = fmt.group_size
        if cfg.expert_format is not None and (fmt.name, group_size) != (cfg.expert_format, cfg.expert_group_size):
            raise MoeOffloadError(f"{ckpt.path} holds {cfg.expert_format} experts (group size "
                                  f"{cfg.expert_group_size}); they cannot be stored as {fmt.name} / {group_size}")
        store = cls(cfg.num_moe_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                    dtype, pin, fmt)
        H, I = cfg.hidden_size, cfg.intermediate_size
        file_packed = getattr(ckpt, "packed_expert", None)  # a GGUF file: its bytes as they are
        with torch.no_grad(), tqdm(total=cfg.num_moe_layers * cfg.num_local_experts, unit="expert",
                                   desc="loading experts to host", disable=not show_progress) as bar:
            for layer in range(cfg.num_moe_layers):  # MoE layer `layer` is the model's first_k_dense_replace + layer
                for e in range(cfg.num_local_experts):
                    names = {w: expert_name(cfg.first_k_dense_replace + layer, e, w, cfg.model_type)
                             for w in ("w1", "w3", "w2")}
                    if file_packed is not None:
                        fmt.write(store.row(layer, e), file_packed(layer, e), H, I)
                    elif cfg.expert_format is not None:  # already packed on disk: no requantization
                        sections = read_packed_expert(ckpt.tensor, names, fmt.name, group_size, cfg.expert_symmetric,
                                                      H, I)
                        fmt.write(store.row(layer, e), sections, H, I)
                    else:
                        store.put(layer, e, *(ckpt.tensor(names[w]) for w in ("w1", "w3", "w2")))
                    bar.update()
        return store
