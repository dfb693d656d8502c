"""Packed experts without offload: every expert of every layer on the device in its layer's format's rows
(the same bytes the host store holds; on the cpu the store's rows themselves, or a GGUF file's memory
map, copied into RAM when it fits), so a quantized resident run and a quantized offloaded run read the
same values. (A GGUF copy holds Q4_0, Q4_K and Q6_K in other layouts, run by other kernels: against int8
activations their float32 sums may differ from the map's in the last bits.)"""

from __future__ import annotations

import warnings
from dataclasses import fields

import torch
from tqdm.auto import tqdm

from ..kernels import hostmem, one_token_experts, run_experts
from .store import HOST_RAM_MARGIN, HostExpertStore, available_host_bytes

# The most a copy into RAM holds over the file's expert bytes: Q4_K repacked is 148 / 144 of them, plus
# 64-byte section alignment
COPY_GROWTH = 1.03


def _tensors(pool) -> list[torch.Tensor]:
    """A pool's tensors, each once."""
    seen, out = set(), []
    for f in fields(pool):
        t = getattr(pool, f.name)
        if isinstance(t, torch.Tensor) and (t.data_ptr(), t.nbytes) not in seen:
            seen.add((t.data_ptr(), t.nbytes))
            out.append(t)
    return out


class PackedResidentExperts:
    """ExpertBackend with every expert packed on `device` ([L, E, row]): no offload.

    On cpu with the loop backend each layer's experts are prepared once for the CPU (the format's
    cpu_pool: PyTorch's weight-only ops for int8 / int4; `extra_bytes` is the host RAM that costs).
    cpu_op=False keeps dequantize-then-matmul, what the offloaded loop computes: the exactness
    reference (`reference()`). A store over a file's memory map (GGUF) is copied into RAM for the CPU
    kernels when it fits (_copy_when_fits; `ram_copy_bytes`), so the map is then read only at load."""

    def __init__(self, store: HostExpertStore, device: torch.device, backend: str = "loop", cpu_op: bool = True,
                 show_progress: bool = False, reserve_bytes: int = 0):
        self.store, self.device = store, device
        L, E = store.num_layers, store.num_experts
        H, I = store.hidden, store.inter
        self.ram_copy_bytes = 0  # experts copied out of a file's memory map into RAM (copy_when_fits)
        if torch.device(device).type == "cpu":  # the store's own rows (or the file's memory map): no copy
            pools = [store.layer_pool(layer) for layer in range(L)]
            if cpu_op and backend == "loop" and store.mapped:
                pools = self._copy_when_fits(pools, show_progress, reserve_bytes)
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

    def _copy_when_fits(self, pools: list, show_progress: bool, reserve_bytes: int) -> list:
        """The pools of a store that reads a file's memory map, copied into huge-page RAM where their
        format has a faster layout there (WeightPool.in_ram, for the compiled CPU kernels) and the copy
        (up to COPY_GROWTH of the store) fits in the RAM available beside `reserve_bytes` (what the rest
        of the model will hold: dense weights, KV cache) and the store's margin; otherwise the map, with
        a warning unless the store already warned that it is larger than RAM. Decode from the copy
        against the map, 734M GGUFs, 2 threads (cpu_vs_llamacpp.json, gguf_paired): Q8_0 1.17x (2 MiB
        pages instead of the file's 4 KiB ones), Q4_0 1.17x (run by the int4 kernels), Q4_K_M 2.00x
        (Q4_K and Q6_K repacked)."""
        from ..kernels import cpu_gemv

        store = self.store
        if not cpu_gemv.available():  # the copies' layouts are for the compiled kernels
            return pools
        copy = int(store.host_bytes * COPY_GROWTH)
        avail = available_host_bytes() - HOST_RAM_MARGIN
        if copy + reserve_bytes > avail:
            if store.host_bytes <= avail:  # (larger than RAM: the store has said so)
                warnings.warn(f"moe-offload: the experts are read from the file's memory map, not copied into RAM: "
                              f"the copy ({copy / 1e9:.2f} GB) and the rest of the model ({reserve_bytes / 1e9:.2f} GB) "
                              f"need more than the {avail / 1e9:.2f} GB available; decode from the map measured "
                              "1.2-2x slower", UserWarning, stacklevel=4)
            return pools
        arena = hostmem.Arena(copy + (64 << 20))  # one buffer for every layer, mapped on first use
        out = []
        try:
            for pool in tqdm(pools, unit="layer", desc="copying experts into RAM", disable=not show_progress):
                copied = pool.in_ram(arena.empty)
                if copied is not None:
                    for t in _tensors(pool):  # the copy read the map: its pages leave the resident set again
                        hostmem.drop_file_pages(t)
                out.append(pool if copied is None else copied)
        except OSError as exc:  # the buffer refused (strict overcommit): the map, as for a file larger than RAM
            warnings.warn(f"moe-offload: the experts are read from the file's memory map: copying them into RAM "
                          f"failed ({exc})", UserWarning, stacklevel=4)
            return pools
        self.ram_copy_bytes = arena.bytes_used
        return out

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
