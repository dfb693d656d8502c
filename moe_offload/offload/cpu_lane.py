"""The CPU lane (hybrid): a missed expert is computed on the host from the host store, instead of
copied, when that finishes sooner than its copy would land.

Decision rule (`split_misses`), per layer, for the layer's missed experts in ascending id: each one
goes to the lane that would finish it first, given what that lane already took this layer:
    link lane: backlog + [wait behind one prefetch chunk] + n_copies * copy_seconds (+ device compute)
    cpu lane:  sum over taken experts of (weight_seconds + tokens * token_seconds)
An expert whose copy is in flight (a prefetch not landed yet) is a candidate too, its link time the
engine's estimate of when it lands if waited for now (`lane_candidates`); the CPU takes it only if it
finishes sooner, and the copy lands anyway for later layers and tokens.
weight_seconds is the expert's bytes over the CPU's measured GB/s for the store's format (a batch-1
expert GEMV is bound by reading its weights once); token_seconds the per-token flops beyond that.

`CpuLane.run` computes the chosen experts for the layer's tokens on the host (`HostExperts`: the
reference SwiGLU expert on the store's rows; for an int8/int4 store the format's CPU op (PyTorch's
weight-only ops), each expert prepared on its first use and kept: int8 costs its scales in the
compute dtype, int4 a repacked copy about the size of the packed expert) and returns their weighted sum, which the backend adds to the device's
result: equal to the all-device run within the dtype's rounding (only the summation order differs).
On CUDA the device kernels for the resident experts are launched first, so both lanes run at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import MoeOffloadError
from .protocols import ExpertStore, HostComputeStore
from .rows import copy_row

CPU_EXPERTS = ("auto", "off")


@dataclass(frozen=True)
class LaneCosts:
    """Seconds each way of serving one missed expert takes (see the module docstring)."""

    copy_seconds: float  # one expert over the link, latency included
    chunk_seconds: float  # the most a demand copy waits behind a prefetch chunk already on the link
    weight_seconds: float  # the CPU reading one expert's weights (expert bytes / CPU GB/s)
    token_seconds: float  # the CPU's extra time per token routed to the expert
    device_seconds: float = 0.0  # the device running one expert once its copy landed

    def __post_init__(self) -> None:
        for name, v in self.__dict__.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MoeOffloadError(f"cpu lane cost {name} must be a finite number >= 0 seconds, got {v!r}")

    def cpu(self, tokens: int) -> float:
        """The CPU's time for one expert over `tokens` tokens."""
        return self.weight_seconds + tokens * self.token_seconds


def split_misses(misses: Sequence[int], tokens: dict[int, int], costs: LaneCosts,
                 link_backlog: float = 0.0, landing: dict[int, float] | None = None) -> list[int]:
    """Which of a layer's missed experts the CPU computes (the rest are copied). tokens[e]: how many
    of the layer's tokens are routed to e; link_backlog: seconds of demand copies already queued;
    landing[e]: for an expert whose copy is in flight (in `misses` too), the seconds until it lands if
    waited for now: the CPU takes it only if it finishes sooner (the copy lands anyway, for later)."""
    landing = landing or {}
    link_t = link_backlog + costs.chunk_seconds
    cpu_t = 0.0
    on_cpu = []
    for e in misses:
        t_link = landing[e] if e in landing else link_t + costs.copy_seconds
        t_cpu = cpu_t + costs.cpu(tokens[e])
        if t_cpu < t_link + costs.device_seconds:
            on_cpu.append(e)
            cpu_t = t_cpu
        elif e not in landing:
            link_t = t_link
    return on_cpu


def lane_candidates(cache, layer: int, needed: Sequence[int], copy_seconds: float) -> tuple[list[int], dict[int, float]]:
    """The experts of `needed` the CPU lane may take: those not resident, and those whose copy is still
    in flight, with the seconds until each of those lands if waited for now (`landing`, from the
    engine's bytes_before_landing at `copy_seconds` per expert)."""
    per_byte = copy_seconds / max(1, cache.store.expert_bytes)
    misses, landing = [], {}
    for e in needed:
        if not cache.is_resident(layer, e):
            misses.append(e)
            continue
        handle = cache.inflight.get((layer, e))
        if handle is None or handle.error is not None:
            continue
        nbytes = cache.engine.bytes_before_landing(handle)
        if nbytes is not None:
            misses.append(e)
            landing[e] = nbytes * per_byte
    return misses, landing


class HostExperts:
    """Runs one expert of the store on the host, in the store's compute dtype (see the module docstring)."""

    def __init__(self, store: HostComputeStore):
        self.store = store
        self.prepared: dict[tuple[int, int], Any] = {}  # (layer, e) -> store.cpu_expert(layer, e)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the store was built for."""
        return self.store.dtype

    @property
    def hidden(self) -> int:
        return self.store.hidden

    @property
    def extra_bytes(self) -> int:
        """Host RAM held by the experts prepared so far."""
        return sum(p.extra_bytes for p in self.prepared.values())

    def ffn(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] in the compute dtype -> [n, H]."""
        expert = self.prepared.get((layer, e))
        if expert is None:
            expert = self.prepared[(layer, e)] = self.store.cpu_expert(layer, e)
        return expert.ffn(0, x)


def measure_cpu_seconds(store: HostComputeStore, reps: int = 3) -> tuple[float, float]:
    """(weight_seconds, token_seconds) of one expert computed from the host store on this CPU, measured
    at 1 and 8 tokens (best of `reps`)."""
    host = HostExperts(store)
    hidden = host.hidden

    def best(n: int) -> float:
        x = torch.zeros(n, hidden, dtype=host.dtype)
        out = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            host.ffn(0, 0, x)
            out = min(out, time.perf_counter() - t0)
        return out

    host.ffn(0, 0, torch.zeros(1, hidden, dtype=host.dtype))  # prepare (quantized stores) before timing
    t1, t8 = best(1), best(8)
    return t1, max(0.0, (t8 - t1) / 7)


FILL_PRIORITY = 1e-3  # a CPU-computed expert is still copied in the background, below every prediction


def fill_after_cpu(cache, layer: int, experts: Sequence[int], protect: set) -> None:
    """Copy CPU-computed experts into the cache behind the predictions (prefetch class, lowest value),
    so reuse can hit later; a copy that would evict a protected (pinned/planned) expert is skipped.
    Demand loads overtake these fills on the link, so they never delay a needed copy by more than a chunk."""
    for e in experts:
        cache.prefetch((layer, int(e)), protect | cache.pinned, priority=FILL_PRIORITY, fill=True)


class LaneDecision:
    """Which missed experts the CPU lane takes (`split_misses` on these costs); a layer with more than
    `max_tokens` tokens copies them all. The simulator's lane is this alone."""

    def __init__(self, costs: LaneCosts, max_tokens: int = 8):
        self.costs, self.max_tokens = costs, max_tokens

    def pick(self, misses: Sequence[int], ids_host: np.ndarray, link_backlog: float = 0.0,
             landing: dict[int, float] | None = None) -> list[int]:
        """The missed experts (ascending) the CPU should compute for these routed ids [N, k]."""
        if not misses or ids_host.shape[0] > self.max_tokens:
            return []
        tokens = {e: int((ids_host == e).any(1).sum()) for e in misses}
        return split_misses(misses, tokens, self.costs, link_backlog, landing)


class CpuLane(LaneDecision):
    """Computes chosen missed experts on the host from the store (see the module docstring)."""

    def __init__(self, store: HostComputeStore, costs: LaneCosts, max_tokens: int = 8):
        super().__init__(costs, max_tokens)
        self.store = store
        self.host = HostExperts(store)

    def run(self, layer: int, experts: Sequence[int], h: torch.Tensor, ids_host: np.ndarray,
            weights: torch.Tensor) -> torch.Tensor:
        """sum over `experts` of weight * expert(h) for the tokens routed to them: [N, H] on the host."""
        x = h.to("cpu", self.host.dtype)  # [N, H]
        w = weights.to("cpu", torch.float32)  # [N, k]
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in experts:
            rows, cols = np.nonzero(ids_host == e)  # tokens routed to e, and at which of their k
            rows_t = torch.from_numpy(rows)
            y = self.host.ffn(layer, e, x.index_select(0, rows_t)).float()  # [c, H]
            out.index_add_(0, rows_t, y * w[rows_t, torch.from_numpy(cols)][:, None])
        return out.to(h.dtype)


def measure_copy_seconds(store: ExpertStore, pool: torch.Tensor, reps: int = 3) -> float:
    """Seconds one expert takes from the host store into a device slot (best of `reps`; at setup,
    before the pool holds anything)."""
    best = math.inf
    cuda = pool.device.type == "cuda"
    for _ in range(reps):
        t0 = time.perf_counter()
        copy_row(pool[0], store.row(0, 0), non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(pool.device)
        best = min(best, time.perf_counter() - t0)
    return best


def build_cpu_lane(cache, mode: str = "auto") -> CpuLane | None:
    """The CPU lane for `cache` with measured costs (mode 'auto'), or None ('off'). A demand copy waits
    behind the engine's `demand_wait_bytes` of prefetch (a whole prefetch on the FIFO CudaCopyEngine)."""
    if mode not in CPU_EXPERTS:
        raise MoeOffloadError(f"cpu_experts {mode!r} is not one of {list(CPU_EXPERTS)}")
    if mode == "off":
        return None
    copy = measure_copy_seconds(cache.store, cache.pool)
    weight, token = measure_cpu_seconds(cache.store)
    behind = cache.engine.demand_wait_bytes
    chunk = copy * min(1.0, behind / max(1, cache.store.expert_bytes))
    return CpuLane(cache.store, LaneCosts(copy, chunk, weight, token))
