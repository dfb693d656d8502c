"""The offloaded expert backend: routed ids -> resident experts -> kernels reading the slot pool."""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import moe_loop, run_experts
from .cache import ExpertCache
from .planner import StepPlanner
from .transfer import Forwarded


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
    The step itself (CPU share, groups, acquire, prefetch plan, fills, release) is planner.StepPlanner's,
    the one the simulator runs too; this class reads the ids back and supplies the kernels (_KernelLanes).
    """

    backend = Forwarded("_lanes")  # the kernels: loop, grouped_mm or triton
    prefetcher = Forwarded("planner")  # offload.prefetch.Prefetcher when a predictor is active, else None
    cpu_lane = Forwarded("planner")  # offload.cpu_lane.CpuLane: missed experts computed on the host, or None

    def __init__(self, cache: ExpertCache, backend: str = "loop"):
        self.cache = cache
        self.planner = StepPlanner(cache)
        self._lanes = _KernelLanes(self.planner, backend)
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
        lanes = self._lanes
        lanes.h, lanes.ids, lanes.weights, lanes.ids_host = h, ids, weights, ids_host
        try:
            self.planner.run(layer, ids_host, pred_host, lanes)
            return lanes.out if lanes.out is not None else torch.zeros_like(h)
        finally:
            lanes.h = lanes.ids = lanes.weights = lanes.ids_host = lanes.out = None


class _KernelLanes:
    """planner.StepLanes on the slot pool: the backend's kernels for device groups, CpuLane.run for the
    CPU's share; the layer's output [N, H] builds up in `out`. One per OffloadedExperts, bound per call."""

    __slots__ = ("planner", "backend", "h", "ids", "weights", "ids_host", "out")

    def __init__(self, planner: StepPlanner, backend: str):
        self.planner, self.backend = planner, backend
        self.h = self.ids = self.weights = self.ids_host = self.out = None

    def device(self, layer: int, group: list[int], on_cpu: list[int], part: bool) -> None:
        h, ids, weights, ids_host = self.h, self.ids, self.weights, self.ids_host  # [N, H], [N, k] x2, [N, k] host
        cache, backend = self.planner.cache, self.backend
        w13_pool, w2_pool = cache.layer_views[layer]  # this layer's views of the slot pool
        if backend == "loop" and part:  # just the group's experts over the same rows: bit-identical sums
            out = self.out if self.out is not None else torch.zeros_like(h)
            self.out = moe_loop(h, ids, weights, w13_pool, w2_pool, cache.slot_list(layer),
                                ids_host=ids_host, experts=set(group), out=out)
        elif not part:
            self.out = run_experts(backend, h, ids, weights, w13_pool, w2_pool, cache.slot_table[layer],
                                   cache.slot_list(layer) if backend == "loop" else None, ids_host)
        elif on_cpu:  # every row; the CPU's assignments redirected to a group expert at weight 0
            cpu_rows = np.isin(ids_host, on_cpu)  # [N, k]
            mask = torch.from_numpy(cpu_rows).to(h.device)
            ids_d = torch.where(mask, torch.full_like(ids, group[0]), ids)  # [N, k]
            w_d = torch.where(mask, torch.zeros_like(weights), weights)
            ids_d_host = np.where(cpu_rows, group[0], ids_host)
            self.out = run_experts(backend, h, ids_d, w_d, w13_pool, w2_pool, cache.slot_table[layer],
                                   None, ids_d_host)
        else:  # one of several groups: the rows touching it, the other assignments redirected at weight 0
            in_group = np.isin(ids_host, group)  # [N, k]
            rows_host = np.flatnonzero(in_group.any(1))
            rows = torch.from_numpy(rows_host).to(h.device)  # [n] tokens touching the group
            mask = torch.from_numpy(in_group).to(h.device)
            ids_g = torch.where(mask, ids, group[0]).index_select(0, rows)  # [n, k]
            w_g = torch.where(mask, weights, torch.zeros_like(weights)).index_select(0, rows)
            ids_g_host = np.where(in_group, ids_host, group[0])[rows_host]
            out = self.out if self.out is not None else torch.zeros_like(h)
            y = run_experts(backend, h.index_select(0, rows), ids_g, w_g, w13_pool, w2_pool, cache.slot_table[layer], None,
                            ids_g_host)  # [n, H]
            # distinct rows: as index_add_, without its slow CPU bf16/fp16 path (kernels.reference.moe_loop)
            self.out = out.index_put_((rows,), y, accumulate=True)

    def cpu(self, layer: int, on_cpu: list[int]) -> None:
        h = self.h  # [N, H]
        out = self.out if self.out is not None else torch.zeros_like(h)
        y = self.planner.cpu_lane.run(layer, on_cpu, h, self.ids_host, self.weights)  # [N, H] on the host
        self.out = out + y.to(h.device, non_blocking=True)
