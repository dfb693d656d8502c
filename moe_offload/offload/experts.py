"""The offloaded expert backend: routed ids -> resident experts -> kernels reading the slot pool."""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import moe_loop, run_experts
from .cache import ExpertCache
from .cpu_lane import fill_after_cpu, lane_candidates


def read_back(t: torch.Tensor) -> np.ndarray:
    """The MoE layer's one device->host read (on CUDA a host sync, by design: the host must know which
    experts to load). benchmarks/gpu_check.py allows exactly this one under CUDA sync debugging."""
    return t.cpu().numpy()


class OffloadedExperts:
    """ExpertBackend over an ExpertCache (plugs into MoeModel.moe_block).

    Per layer, the host reads the routed ids back, with the prefetcher's predictions for the layers
    ahead folded into the same transfer: ONE device->host read per MoE layer (the host must know
    which experts to load). It then makes them resident and runs the backend on the slot pool.
    When a layer needs more experts than it can hold at once (prefill with few slots), they are
    processed in ascending groups that fit. The loop backend then runs just the group's experts over
    the same token rows, so results are bit-identical to the resident run; kernel backends get the
    group's assignments with the others redirected to a group expert at weight 0 (exact zeros added;
    equal to the resident run within float rounding, as the GEMM row blocking differs).
    """

    def __init__(self, cache: ExpertCache, backend: str = "loop"):
        self.cache = cache
        self.backend = backend
        self.prefetcher = None  # offload.prefetch.Prefetcher, when a predictor is active
        self.cpu_lane = None  # offload.cpu_lane.CpuLane: missed experts computed on the host (hybrid)
        # A speculative verify pass sets this: (layer, ids_host [N, k]) -> how many leading rows (>= 1)
        # are worth their misses; the rest are dropped from this layer on (see pop_kept_rows).
        self.verify_rule = None
        self._kept_rows: int | None = None

    def pop_kept_rows(self) -> int | None:
        """Rows the last call kept when a verify rule dropped trailing ones (the model then carries only
        those positions into later layers); None when it kept all. Reading it clears it."""
        kept, self._kept_rows = self._kept_rows, None
        return kept

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        pf = self.prefetcher
        pred = pf.predict(layer) if pf is not None else None  # [P] on the device, or None
        flat = ids.reshape(-1)  # [N*k]
        both = flat if pred is None else torch.cat([flat, pred.to(flat.dtype)])
        host = read_back(both)  # [N*k + P]: the layer's one device->host read
        ids_host = host[: flat.numel()].reshape(ids.shape)  # [N, k]
        pred_host = host[flat.numel():] if pred is not None else None
        n = ids_host.shape[0]
        if self.verify_rule is not None and n > 1:
            keep = max(1, min(n, int(self.verify_rule(layer, ids_host))))
            if keep < n:  # later positions are dropped: their rows of the output stay zero
                self._kept_rows = keep
                out = torch.zeros_like(h)
                out[:keep] = self._compute(layer, h[:keep], ids[:keep], weights[:keep], ids_host[:keep], pred_host)
                return out
        return self._compute(layer, h, ids, weights, ids_host, pred_host)

    def _compute(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ids_host: np.ndarray,
                 pred_host: np.ndarray | None) -> torch.Tensor:
        needed = np.unique(ids_host).tolist()  # ascending
        if self.cpu_lane is not None:
            on_cpu = self._cpu_share(layer, needed, ids_host)
            if on_cpu:
                return self._run_hybrid(layer, needed, on_cpu, h, ids, weights, ids_host, pred_host)
        groups = self.cache.fit_groups(layer, needed)
        if len(groups) == 1:
            return self._run(layer, groups[0], h, ids, weights, ids_host, pred_host)
        out = torch.zeros_like(h)
        if self.backend == "loop":
            for group in groups:
                self.cache.acquire(layer, group)
                try:
                    moe_loop(h, ids, weights, self.cache.w13_pool, self.cache.w2_pool,
                             self.cache.slot_list(layer), ids_host=ids_host, experts=set(group), out=out)
                finally:
                    self.cache.release(layer, group)
            return out
        for group in groups:
            in_group = np.isin(ids_host, group)  # [N, k]
            rows_host = np.flatnonzero(in_group.any(1))
            rows = torch.from_numpy(rows_host).to(h.device)  # tokens touching the group
            mask = torch.from_numpy(in_group).to(h.device)
            ids_g = torch.where(mask, ids, group[0])[rows]
            w_g = torch.where(mask, weights, torch.zeros_like(weights))[rows]
            ids_g_host = np.where(in_group, ids_host, group[0])[rows_host]
            out.index_add_(0, rows, self._run(layer, group, h[rows], ids_g, w_g, ids_g_host, None))
        return out

    def _cpu_share(self, layer: int, needed: list[int], ids_host: np.ndarray) -> list[int]:
        """The missed experts (not resident, or their copy still in flight) the CPU lane should compute."""
        cache = self.cache
        misses, landing = lane_candidates(cache, layer, needed, self.cpu_lane.costs.copy_seconds)
        on_cpu = self.cpu_lane.pick(misses, ids_host, landing=landing)
        return on_cpu if len(needed) - len(on_cpu) <= cache.capacity(layer) else []

    def _run_hybrid(self, layer: int, needed: list[int], on_cpu: list[int], h: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, ids_host: np.ndarray, pred_host: np.ndarray | None) -> torch.Tensor:
        """Device experts on the slot pool (launched first), CPU experts from the host store; summed."""
        on_dev = [e for e in needed if e not in on_cpu]
        st = self.cache.stats
        st.uses[layer] += len(on_cpu)
        st.misses[layer] += len(on_cpu)
        st.cpu_experts[layer] += len(on_cpu)
        if on_dev and self.backend == "loop":  # the loop runs just the device experts over the same rows
            out = self._run(layer, on_dev, h, ids, weights, ids_host, pred_host, only=set(on_dev))
        elif on_dev:
            cpu_rows = np.isin(ids_host, on_cpu)  # [N, k] assignments the CPU computes
            mask = torch.from_numpy(cpu_rows).to(h.device)
            ids_d = torch.where(mask, torch.full_like(ids, on_dev[0]), ids)  # [N, k]: redirected at weight 0
            w_d = torch.where(mask, torch.zeros_like(weights), weights)
            ids_d_host = np.where(cpu_rows, on_dev[0], ids_host)
            out = self._run(layer, on_dev, h, ids_d, w_d, ids_d_host, pred_host, only=set(on_dev))
        else:
            out = torch.zeros_like(h)
            if pred_host is not None:
                self.prefetcher.issue(layer, pred_host)
        out = out + self.cpu_lane.run(layer, on_cpu, h, ids_host, weights).to(h.device, non_blocking=True)
        fill_after_cpu(self.cache, layer, on_cpu, self.prefetcher.protect if self.prefetcher is not None else set())
        return out

    def _run(self, layer: int, group: list[int], h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             ids_host: np.ndarray, pred_host: np.ndarray | None, only: set[int] | None = None) -> torch.Tensor:
        cache = self.cache
        cache.acquire(layer, group)
        try:
            if pred_host is not None:
                self.prefetcher.issue(layer, pred_host)  # loads for layers ahead overlap this compute
            slot_list = cache.slot_list(layer) if self.backend == "loop" else None
            if only is not None and self.backend == "loop":
                return moe_loop(h, ids, weights, cache.w13_pool, cache.w2_pool, slot_list, ids_host=ids_host,
                                experts=only)
            return run_experts(self.backend, h, ids, weights, cache.w13_pool, cache.w2_pool,
                               cache.slot_table[layer], slot_list, ids_host)
        finally:
            cache.release(layer, group)
