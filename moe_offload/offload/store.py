"""Host tier (protocols.ExpertStore): every expert (w1, w3, w2) packed contiguously inside one large (pinned) host allocation."""

from __future__ import annotations

import psutil
import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, expert_name
from ..errors import MoeOffloadError
from ..kernels.quant import QuantPool
from ..quant.formats import DEFAULT_GROUP_SIZE, QUANT_FORMATS, expert_bytes
from ..quant.ckpt import read_packed_expert
from ..quant.pack import pool_views as quant_pool_views, quantize_expert, write_expert

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


class HostExpertStore:
    """All experts of a model in host memory, one contiguous row per expert: [w1 | w3 | w2] flattened.

    `row(layer, e)` is one expert, so one host-to-device copy moves it. The buffer is pinned when
    `pin` is True (CUDA runs), so copies can run asynchronously on a copy stream.
    With `fmt` 'int8' or 'int4' a row is instead the packed bytes of one quantized expert (uint8;
    layout in moe_offload.quant.formats), quantized as it is put, and `pool_views` gives a QuantPool.
    """

    def __init__(self, num_layers: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 pin: bool = False, fmt: str | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.fmt = fmt if fmt in QUANT_FORMATS else None
        self.group_size = group_size
        if self.fmt is not None:
            self.expert_elems = self.expert_bytes = expert_bytes(hidden, inter, self.fmt, group_size)
            row_dtype = torch.uint8
        else:
            self.expert_elems = 3 * hidden * inter
            self.expert_bytes = self.expert_elems * torch.tensor([], dtype=dtype).element_size()
            row_dtype = dtype
        check_host_ram(num_layers * num_experts * self.expert_bytes, "the host expert store")
        self.buffer = torch.empty(num_layers * num_experts, self.expert_elems, dtype=row_dtype, pin_memory=pin)
        self.pinned = pin

    def row(self, layer: int, e: int) -> torch.Tensor:
        """Expert (layer, e) as one contiguous [3*H*I] row."""
        return self.buffer[layer * self.num_experts + e]

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """An uninitialised device pool [S, row] in the store's row dtype."""
        return torch.empty(num_slots, self.expert_elems, dtype=self.buffer.dtype, device=device)

    def pool_views(self, pool: torch.Tensor) -> tuple[torch.Tensor | QuantPool, torch.Tensor | None]:
        """w13 [S, 2I, H] and w2 [S, H, I] views of a pool (rows laid out as in the store); for a
        quantized store (QuantPool of the pool's sections, None)."""
        if self.fmt is not None:
            return quant_pool_views(pool, self.hidden, self.inter, self.fmt, self.group_size), None
        s, h, i = pool.shape[0], self.hidden, self.inter
        return pool[:, : 2 * i * h].view(s, 2 * i, h), pool[:, 2 * i * h:].view(s, h, i)

    def w13(self, layer: int, e: int) -> torch.Tensor:
        return self.row(layer, e)[: 2 * self.inter * self.hidden].view(2 * self.inter, self.hidden)

    def w2(self, layer: int, e: int) -> torch.Tensor:
        return self.row(layer, e)[2 * self.inter * self.hidden:].view(self.hidden, self.inter)

    def put(self, layer: int, e: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Store one expert from its three matrices (w1, w3: [I, H]; w2: [H, I]), quantizing it when
        the store is quantized."""
        if self.fmt is not None:
            write_expert(self.row(layer, e), quantize_expert(w1, w3, w2, self.fmt, self.group_size),
                         self.hidden, self.inter, self.fmt, self.group_size)
            return
        w13 = self.w13(layer, e)
        w13[: self.inter].copy_(w1)
        w13[self.inter:].copy_(w3)
        self.w2(layer, e).copy_(w2)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype, pin: bool = False,
                        show_progress: bool = False, fmt: str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE) -> "HostExpertStore":
        """Fill the store straight from the checkpoint's memory map, one expert at a time (quantized
        on the way in when `fmt` is int8/int4: only one expert is ever held unquantized)."""
        cfg = ckpt.config
        if cfg.expert_format is not None and (fmt, group_size) != (cfg.expert_format, cfg.expert_group_size):
            raise MoeOffloadError(f"{ckpt.path} holds {cfg.expert_format} experts (group size "
                                  f"{cfg.expert_group_size}); they cannot be stored as {fmt} / {group_size}")
        store = cls(cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                    dtype, pin, fmt, group_size)
        H, I = cfg.hidden_size, cfg.intermediate_size
        with torch.no_grad(), tqdm(total=cfg.num_hidden_layers * cfg.num_local_experts, unit="expert",
                                   desc="loading experts to host", disable=not show_progress) as bar:
            for layer in range(cfg.num_hidden_layers):
                for e in range(cfg.num_local_experts):
                    names = {w: expert_name(layer, e, w, cfg.model_type) for w in ("w1", "w3", "w2")}
                    if cfg.expert_format is not None:  # already packed on disk: no requantization
                        sections = read_packed_expert(ckpt.tensor, names, fmt, group_size, cfg.expert_symmetric, H, I)
                        write_expert(store.row(layer, e), sections, H, I, fmt, group_size)
                    else:
                        store.put(layer, e, *(ckpt.tensor(names[w]) for w in ("w1", "w3", "w2")))
                    bar.update()
        return store
