"""The per-layer step, written once: the runtime (OffloadedExperts) and the simulator
(analysis.sim.run_timeline) both run it, and differ only in how a part of the step is computed.

`StepPlanner.plan` decides the step from the layer's routed ids (host):
  - the CPU lane's share: of the missed experts (not resident, or their copy still in flight), those
    the lane finishes sooner than their copy would land (cpu_lane.lane_candidates + lane.pick); taken
    only if the remaining device experts fit the layer's capacity at once;
  - the device experts in ascending groups that fit the layer's capacity (ExpertCache.fit_groups; one
    group in decode, several for a prefill or a verify pass with few slots).
`StepPlanner.run` then executes it in one fixed order:
  count the CPU experts (a use and a miss each) ->
  for each group: acquire (demand loads, waits) -> on the first group only: issue the prefetch plan
  for the layers ahead -> the device compute of the group -> release ->
  the CPU compute -> background copies of the CPU experts into the cache, behind the predictions
  (fill_after_cpu; the device group is released by then, so a fill may take one of its slots).
The caller supplies the compute as a `StepLanes`: real kernels and CpuLane.run (runtime), or advancing
a virtual clock by the hardware profile's costs (simulator).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .cache import ExpertCache
from .cpu_lane import fill_after_cpu, lane_candidates

_NO_PROTECT: frozenset = frozenset()


class StepLanes(Protocol):
    """The compute of one step's parts: what differs between the runtime and the simulator."""

    def device(self, layer: int, group: list[int], on_cpu: list[int], part: bool) -> None:
        """Compute `group` (resident and pinned) on the device. part: the group is not all of the layer's
        routed experts (several groups, or the CPU computes the others)."""

    def cpu(self, layer: int, on_cpu: list[int]) -> None:
        """Compute `on_cpu` on the host; called once, after the device group's compute was issued."""


class StepPlanner:
    """Owns the cache, the prefetcher (None: no prediction) and the CPU lane decision (None: no lane;
    anything with `costs` (cpu_lane.LaneCosts) and `pick`, e.g. cpu_lane.LaneDecision or CpuLane)."""

    def __init__(self, cache: ExpertCache, prefetcher=None, cpu_lane=None):
        self.cache, self.prefetcher, self.cpu_lane = cache, prefetcher, cpu_lane

    def plan(self, layer: int, ids_host: np.ndarray) -> tuple[list[int], list[list[int]]]:
        """ids_host [N, k] -> (on_cpu, groups): the experts the CPU lane computes (ascending) and the
        device experts in ascending groups that fit at once ([[]] when there are none)."""
        cache = self.cache
        needed = np.unique(ids_host).tolist()  # ascending
        cap = cache.capacity(layer)
        lane = self.cpu_lane
        if lane is not None:
            misses, landing = lane_candidates(cache, layer, needed, lane.costs.copy_seconds)
            on_cpu = lane.pick(misses, ids_host, landing=landing)
            if on_cpu and len(needed) - len(on_cpu) <= cap:
                return on_cpu, [[e for e in needed if e not in on_cpu]]
        return [], [needed] if len(needed) <= cap else cache.fit_groups(layer, needed)

    def run(self, layer: int, ids_host: np.ndarray, pred_host: np.ndarray | None, lanes: StepLanes) -> None:
        """Plan and execute layer `layer`'s step for routed ids [N, k]; pred_host [n * depth]: the
        prefetcher's predictions for the layers ahead (Prefetcher.predict, read back), or None."""
        on_cpu, groups = self.plan(layer, ids_host)
        cache, pf = self.cache, self.prefetcher
        if on_cpu:  # a use and a miss each, never acquired
            st = cache.stats
            st.uses[layer] += len(on_cpu)
            st.misses[layer] += len(on_cpu)
            st.cpu_experts[layer] += len(on_cpu)
        part = len(groups) > 1 or bool(on_cpu)
        first = True
        for group in groups:
            if group:
                cache.acquire(layer, group)
            try:
                if first and pred_host is not None:
                    pf.issue(layer, pred_host)  # loads for layers ahead overlap this compute
                if group:
                    lanes.device(layer, group, on_cpu, part)
            finally:
                if group:
                    cache.release(layer, group)
            first = False
        if on_cpu:  # one device group at most: its work is queued already, so both lanes run at once
            lanes.cpu(layer, on_cpu)
            fill_after_cpu(cache, layer, on_cpu, pf.protect if pf is not None else _NO_PROTECT)
