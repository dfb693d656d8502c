"""Event-driven decode timeline: one compute stream, one copy stream, the real cache/policy/prefetch code.

A recorded routing trace drives the real ExpertCache and Prefetcher; only the copy engine and the clock
are simulated: SimCopyEngine puts each load on a FIFO link (bytes / bandwidth + latency) in virtual
time, and waiting on a load that has not finished advances the compute stream's clock (an exposed
copy). Per token and layer the compute stream spends: attention (dense bytes / HBM bandwidth, or
flops / throughput, whichever is larger, plus a launch allowance), host bookkeeping, the routed
experts' GEMMs (the same bound), and at the end the LM head.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Callable

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import MoeOffloadError
from ..offload.cache import ExpertCache
from ..offload.policy import EvictionPolicy, make_policy
from ..offload.cpu_lane import LaneCosts, LaneDecision
from ..offload.link import LinkScheduler
from ..offload.planner import StepPlanner
from ..offload.prefetch import Prefetcher
from ..offload.protocols import CopyEngine, Key
from ..offload.transfer import LoadHandle

# Expert formats the simulator projects (sizes from moe_offload.formats; the int formats with
# an fp16 scale and zero point per group of SIM_GROUP_SIZE along the input dimension).
SIM_FORMATS = ("bf16", "fp16", "int8", "int4", "int3", "int2")
SIM_GROUP_SIZE = 64
# The formats published checkpoints ship in, by the name the simulator takes: each a moe_offload.formats
# object whose expert_bytes are the file's bytes (q4_k_m: llama.cpp's per-layer Q4_K / Q6_K mix,
# q4_k_m_layers). Their dense weights: bytes per parameter the projection charges (q4_k_m: Q4_K's
# 144 bytes per 256 weights; fp8: one byte, the block scales under 0.01%; GPT-OSS ships its attention in bf16).
SHIPPED_FORMATS = {"q4_k_m": None, "fp8": "fp8:128x128", "mxfp4": "mxfp4"}
SIM_DTYPES = SIM_FORMATS + tuple(SHIPPED_FORMATS)


def q4_k_m_layers(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(gate, up, down) GGUF types of each MoE layer in a Q4_K_M file as llama.cpp's quantizer writes it
    (src/llama-quant.cpp): Q4_K, except the down projection of the layers its use_more_bits rule picks
    (block index i of n = num_hidden_layers: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2) in Q6_K; a
    matrix whose input width is no multiple of 256 falls back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    from ..formats.gguf import BLOCK_TYPES

    n = cfg.num_hidden_layers
    fallback = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

    def fit(t: str, k: int) -> str:
        return t if k % BLOCK_TYPES[t].block == 0 else fallback[t]

    out = []
    for j in range(cfg.num_moe_layers):
        i = cfg.first_k_dense_replace + j
        more = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2  # C integer division: n >= 8 here
        down = "Q6_K" if more else "Q4_K"
        out.append((fit("Q4_K", cfg.hidden_size), fit("Q4_K", cfg.hidden_size), fit(down, cfg.intermediate_size)))
    return out


def sim_format(cfg: ModelConfig, expert_dtype: str):
    """The moe_offload.formats object whose sizes the simulator uses for `expert_dtype` (one of SIM_DTYPES)."""
    from ..formats import get_format
    from ..formats.gguf import gguf_layers_name

    if expert_dtype not in SIM_DTYPES:
        raise MoeOffloadError(f"expert dtype {expert_dtype!r} is not one of {list(SIM_DTYPES)}")
    if expert_dtype == "q4_k_m":
        return get_format(gguf_layers_name(q4_k_m_layers(cfg)))
    return get_format(SHIPPED_FORMATS.get(expert_dtype) or expert_dtype, SIM_GROUP_SIZE)


def expert_layer_bytes(cfg: ModelConfig, expert_dtype: str) -> list[int]:
    """Bytes of one expert in each MoE layer in `expert_dtype` (the format object's expert_bytes), plus the
    family's expert biases in bf16 where it has them (GPT-OSS)."""
    fmt = sim_format(cfg, expert_dtype)
    bias = 2 * (2 * cfg.intermediate_size + cfg.hidden_size) if cfg.expert_bias else 0
    try:
        layers = fmt.per_layer(cfg.num_moe_layers)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    return [f.expert_bytes(cfg.hidden_size, cfg.intermediate_size) + bias for f in layers]


@dataclass(frozen=True)
class Hardware:
    key: str
    name: str
    memory_gb: float
    hbm_gbps: float
    bf16_tflops: float
    link_gbps: float
    link_latency_us: float
    kernel_overhead_us: float
    source: str


@dataclass(frozen=True)
class CpuProfile:
    """The host CPU of the CPU lane: effective memory GB/s, cores, per-format GEMV efficiency."""

    key: str
    name: str
    memory_gbps: float
    cores: int
    efficiency: dict
    source: str

    def lane_costs(self, costs: "StepCosts", expert_dtype: str, chunk_bytes: int | None) -> LaneCosts:
        """The CPU lane's costs for one expert of `costs` in `expert_dtype` (batch 1: weight-read bound)."""
        if expert_dtype not in self.efficiency:
            raise MoeOffloadError(f"cpu profile {self.key!r} has no efficiency for {expert_dtype!r}; "
                                  f"it has {sorted(self.efficiency)}")
        weight = costs.expert_bytes / (self.memory_gbps * 1e9 * self.efficiency[expert_dtype])
        chunk = costs.copy * min(1.0, (chunk_bytes or costs.expert_bytes) / costs.expert_bytes)
        return LaneCosts(copy_seconds=costs.copy, chunk_seconds=chunk, weight_seconds=weight, token_seconds=0.0,
                         device_seconds=costs.expert)


def _profiles(asset: str, make: Callable[..., Any]) -> dict[str, Any]:
    """The named entries of a JSON asset as `make(key=name, **entry)` (keys starting with '_' are notes)."""
    raw = json.loads((resources.files("moe_offload") / "assets" / asset).read_text())
    return {k: make(key=k, **v) for k, v in raw.items() if not k.startswith("_")}


def _named(profiles: dict[str, Any], name: str, what: str) -> Any:
    if name not in profiles:
        raise MoeOffloadError(f"{what} {name!r} is not one of {sorted(profiles)}")
    return profiles[name]


def hardware_profiles() -> dict[str, Hardware]:
    return _profiles("hardware_profiles.json", Hardware)


def cpu_profiles() -> dict[str, CpuProfile]:
    return _profiles("cpu_profiles.json", CpuProfile)


def get_hardware(name: str) -> Hardware:
    return _named(hardware_profiles(), name, "hardware")


def get_cpu(name: str) -> CpuProfile:
    return _named(cpu_profiles(), name, "cpu profile")


@dataclass(frozen=True)
class StepCosts:
    """Seconds per event of one decode step (per layer unless named otherwise)."""

    attention: float
    expert: float  # one routed expert's GEMMs at batch 1
    bookkeeping: float
    head: float  # per token
    copy: float  # one expert over the link, latency included
    expert_bytes: int  # one expert, the mean over layers (what a copy moves, what a GEMV reads)
    slot_bytes: int | None = None  # one device slot: the largest layer's expert (None: expert_bytes)

    def peek_row(self, cfg: ModelConfig, hw: "Hardware", expert_rank: int, impl: "ImplParams | None" = None) -> float:
        """Seconds of one attention-peek prediction row (predict/accelerator.py): the target layer's
        attention on the estimated residual plus the stand-in of its experts (float32, dense over E)."""
        impl = impl or IMPL_THIS
        stand_in = 4 * cfg.num_local_experts * 2 * expert_rank * cfg.hidden_size
        return self.attention + (stand_in / (hw.hbm_gbps * 1e9 * impl.kernel_efficiency) + hw.kernel_overhead_us * 1e-6
                                 if expert_rank else 0.0)

    @classmethod
    def for_model(cls, cfg: ModelConfig, hw: Hardware, expert_dtype: str = "bf16",
                  bookkeeping_us: float = 20.0, impl: "ImplParams | None" = None) -> "StepCosts":
        """Costs of `cfg` on `hw`; `impl` (default: this runtime's, IMPL_THIS) holds what belongs to the
        implementation rather than the hardware: kernel efficiency, per-layer overhead, link use."""
        layer_bytes = expert_layer_bytes(cfg, expert_dtype)  # refuses a name not in SIM_DTYPES
        impl = impl or IMPL_THIS
        bw, flops = hw.hbm_gbps * 1e9 * impl.kernel_efficiency, hw.bf16_tflops * 1e12 * impl.kernel_efficiency
        hd, h = cfg.head_dim, cfg.hidden_size
        # the dense work of an average layer: attention's projections (MLA: its LoRA factors), the resident
        # shared expert, and the dense first layers' MLPs spread over all layers
        attn_params = (cfg.attention_params if cfg.attention == "mla"
                       else h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads))
        attn_params += (3 * h * cfg.shared_expert_intermediate_size * cfg.num_moe_layers
                        + 3 * h * cfg.dense_intermediate_size * cfg.first_k_dense_replace) // cfg.num_hidden_layers
        attention = (max(impl.attention_bytes_per_param * attn_params / bw, 2 * attn_params / flops)
                     + hw.kernel_overhead_us * 1e-6)
        expert_bytes = round(sum(layer_bytes) / len(layer_bytes))
        expert = max(expert_bytes / bw, 2 * cfg.expert_params / flops)
        head = 2 * cfg.vocab_size * cfg.hidden_size / bw
        copy = expert_bytes / (hw.link_gbps * 1e9 * impl.link_efficiency) + hw.link_latency_us * 1e-6
        return cls(attention, expert, (bookkeeping_us + impl.layer_overhead_us) * 1e-6, head, copy, expert_bytes,
                   max(layer_bytes))


@dataclass(frozen=True)
class ImplParams:
    """What belongs to an implementation, not to the hardware (fitted for reference implementations)."""

    key: str
    kernel_efficiency: float = 1.0  # fraction of HBM bandwidth / peak flops its kernels reach
    layer_overhead_us: float = 0.0  # host/launch time per layer beyond the hardware's kernel allowance
    link_efficiency: float = 1.0  # fraction of the profile's link GB/s its copies reach
    attention_bytes_per_param: float = 2.0  # bf16 attention = 2; HQQ 4-bit ~ 0.56
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("kernel_efficiency", "link_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise MoeOffloadError(f"implementation {self.key!r}: {name} must be in (0, 1], got {v}")
        if self.layer_overhead_us < 0 or self.attention_bytes_per_param <= 0:
            raise MoeOffloadError(f"implementation {self.key!r}: layer_overhead_us must be >= 0 and "
                                  f"attention_bytes_per_param > 0")


IMPL_THIS = ImplParams("moe-offload", source="this runtime: the hardware profile's figures as they are")


def implementations() -> dict[str, ImplParams]:
    def make(key: str, **entry: Any) -> ImplParams:  # entries also hold notes that are no parameter
        return ImplParams(key=key, **{f: v for f, v in entry.items() if f in ImplParams.__dataclass_fields__})

    return {IMPL_THIS.key: IMPL_THIS, **_profiles("reference_impls.json", make)}


def get_impl(name: str) -> ImplParams:
    return _named(implementations(), name, "implementation")


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class _SimHandle(LoadHandle):
    def __init__(self, key: Key, slot: int, engine: "SimCopyEngine"):
        super().__init__(key, slot)
        self.t_done: float | None = None
        self.engine = engine

    def done(self) -> bool:
        now = self.engine.clock.now
        self.engine.advance(now)
        return self.t_done is not None and self.t_done <= now


class SimCopyEngine(CopyEngine):
    """protocols.CopyEngine in virtual time over the runtime's link scheduler (offload.link): one
    link moving one chunk at a time, demand loads first, prefetches by value; a load of one expert
    takes `copy_seconds` of link time (latency included), split over its chunks by bytes.
    With chunk_bytes >= expert_bytes and no prefetch this is a FIFO link."""

    def __init__(self, clock: VirtualClock, copy_seconds: float, expert_bytes: int = 1,
                 chunk_bytes: int | None = None):
        self.clock, self.copy_seconds, self.expert_bytes = clock, copy_seconds, max(1, int(expert_bytes))
        self.sched = LinkScheduler(chunk_bytes or self.expert_bytes)
        self.link_time = 0.0  # the link is busy (or was idle) up to here
        self._on_link: tuple[Any, float] | None = None  # (job, time its chunk lands)
        self.busy_seconds = 0.0

    def advance(self, until: float) -> None:
        """Run the link up to virtual time `until`: chunks whose copy ends by then land; the chunk
        on the link at `until` stays there (its end is known)."""
        while True:
            if self._on_link is None:
                item = self.sched.next_chunk()
                if item is None:
                    self.link_time = max(self.link_time, until)  # idle
                    return
                job, _, n = item
                dur = self.copy_seconds * n / job.nbytes if job.nbytes else self.copy_seconds
                self._on_link = (job, self.link_time + dur)
                self.busy_seconds += dur
            job, t_end = self._on_link
            if t_end > until:
                return
            self._on_link = None
            self.link_time = t_end
            if self.sched.chunk_done(job):
                job.handle.t_done = t_end

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> LoadHandle:
        self.advance(self.clock.now)
        handle = _SimHandle(key, slot, self)
        handle.prefetch = prefetch
        self.sched.submit(handle, self.expert_bytes, demand=not prefetch, priority=priority)
        self.advance(self.clock.now)  # an idle link starts it now
        return handle

    @property
    def demand_wait_bytes(self) -> int:
        return self.sched.chunk_bytes

    def bytes_before_landing(self, handle: LoadHandle) -> int | None:
        """Bytes (of link time) before this load lands if it is needed now, or None once it landed."""
        self.advance(self.clock.now)
        if handle.t_done is not None:
            return None if handle.t_done <= self.clock.now else int(
                (handle.t_done - self.clock.now) / self.copy_seconds * self.expert_bytes)
        on_link = 0.0 if self._on_link is None else max(0.0, self._on_link[1] - self.clock.now)
        ahead = self.sched.demand_bytes_ahead(handle) or 0
        return ahead + int(on_link / self.copy_seconds * self.expert_bytes)

    def promote(self, handle: LoadHandle) -> None:
        self.sched.promote(handle)

    def reprioritize(self, handle: LoadHandle, priority: float) -> None:
        self.advance(self.clock.now)
        self.sched.reprioritize(handle, priority)

    def cancel(self, handle: LoadHandle) -> int | None:
        self.advance(self.clock.now)
        unsent = self.sched.cancel(handle)
        if unsent is not None:
            handle.error = RuntimeError("cancelled")
        return unsent

    def wait(self, handle: LoadHandle) -> float:
        self.promote(handle)
        self.advance(self.clock.now)
        while handle.t_done is None:  # the host blocks: the link runs on until this load lands
            if self._on_link is None and self.sched.job(handle) is None:
                raise MoeOffloadError(f"simulated link lost the load of {handle.key}")
            self.advance(self._on_link[1] if self._on_link is not None else self.clock.now)
        stall = max(0.0, handle.t_done - self.clock.now)
        self.clock.now += stall
        return stall

    def fence(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


class VirtualStore:
    """protocols.ExpertStore where no bytes move (simulation): sizes only, empty rows and pool."""

    def __init__(self, num_layers: int, num_experts: int, expert_bytes: int):
        self.num_layers, self.num_experts, self.expert_bytes = num_layers, num_experts, expert_bytes
        self._empty = torch.empty(0)

    def row(self, layer: int, e: int) -> torch.Tensor:
        return self._empty

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        return torch.empty(num_slots, 0)

    def pool_views(self, pool: torch.Tensor) -> tuple[None, None]:
        return None, None


class Belady(EvictionPolicy):
    """Offline optimal eviction: the resident expert whose next use is farthest in the future.
    `step` must be set to the index of the current (token, layer) access before each acquire."""

    name = "belady"

    def __init__(self, routed_ids: np.ndarray):
        super().__init__()
        T, L, _ = routed_ids.shape
        self.uses: dict[Key, list[int]] = {}
        for t in range(T):
            for l in range(L):
                for e in set(routed_ids[t, l].tolist()):
                    self.uses.setdefault((l, e), []).append(t * L + l)
        self.step = 0

    def next_use(self, key: Key) -> float:
        steps = self.uses.get(key, [])
        i = bisect.bisect_right(steps, self.step)
        return steps[i] if i < len(steps) else math.inf

    def victim(self, candidates) -> Key:
        return max(candidates, key=lambda k: (self.next_use(k), -self.last_use.get(k, 0)))


class RecordedPredictor:
    """protocols.Predictor replaying scores recorded in a trace: preds [T, L, D, E] and embedding
    scores [T, D, E] (the next-gate-on-embedding plan of a token's first layers)."""

    def __init__(self, name: str, preds: np.ndarray, embed: np.ndarray | None, cross_token: bool = False):
        self.name, self.preds, self.embed = name, preds, embed
        self.lookahead = preds.shape[2]
        self.cross_token = cross_token  # rows past the last layer score the next token's layers

    def scores(self, layer: int, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return torch.from_numpy(np.nan_to_num(self.preds[start_pos, layer], nan=-1.0))[None]  # [1, D, E]

    def observe(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        pass

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        if self.embed is None:
            return np.zeros((0, take), dtype=np.int64)
        return np.argsort(-self.embed[pos], axis=-1, kind="stable")[:, :take]  # [D, take]


@dataclass
class TimelineResult:
    tokens: int
    seconds: float
    compute_seconds: float
    exposed_copy_seconds: float
    bookkeeping_seconds: float
    link_busy_seconds: float
    stats: dict[str, Any]
    cpu_wait_seconds: float = 0.0  # the device idle, waiting for the CPU lane's experts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VirtualLanes:
    """planner.StepLanes in virtual time: a device group costs its experts' GEMMs on the compute stream;
    the CPU lane's experts run one after another from the moment the layer's ids were known (`t_ids`),
    concurrently with the device's waits and GEMMs, and the device waits for them at the layer's end."""

    def __init__(self, clock: VirtualClock, costs: StepCosts, cpu: LaneCosts | None):
        self.clock, self.costs, self.cpu_costs = clock, costs, cpu
        self.t_ids = 0.0
        self.compute = 0.0  # seconds of device compute
        self.cpu_wait = 0.0  # seconds the device idled, waiting for the CPU lane

    def device(self, layer: int, group: list[int], on_cpu: list[int], part: bool) -> None:
        work = self.costs.expert * len(group)
        self.clock.now += work
        self.compute += work

    def cpu(self, layer: int, on_cpu: list[int]) -> None:
        end = self.t_ids + sum(self.cpu_costs.cpu(1) for _ in on_cpu)  # one token per expert (decode)
        if end > self.clock.now:  # the device done, the CPU lane not yet
            self.cpu_wait += end - self.clock.now
            self.clock.now = end


def run_timeline(routed_ids: np.ndarray, num_experts: int, slots: int, policy: str, costs: StepCosts,
                 predictor: RecordedPredictor | None = None, margin: int = 0, window: int = 1,
                 on_step: Callable[[int, int], None] | None = None,
                 chunk_bytes: int | None = None, cpu: LaneCosts | None = None,
                 rank_depth: int | None = None, predictor_seconds: np.ndarray | None = None) -> TimelineResult:
    """Replay routing [T, L, k] through the runtime's step planner (offload.planner: the real ExpertCache,
    Prefetcher and CPU lane decision) on a simulated link, its compute in virtual time (VirtualLanes).
    chunk_bytes: the link's chunk (None: whole experts, a FIFO link for demand loads). cpu: the CPU
    lane's costs (offload.cpu_lane): missed experts it wins per split_misses run on the CPU from the
    moment the layer's ids are known, concurrently with the device's waits and GEMMs.
    predictor_seconds [L]: the predictor's own device time at each layer (before its plan is issued)."""
    T, L, k = routed_ids.shape
    clock = VirtualClock()
    engine = SimCopyEngine(clock, costs.copy, costs.expert_bytes, chunk_bytes)
    pol = Belady(routed_ids) if policy == "belady" else make_policy(policy)
    cache = ExpertCache(VirtualStore(L, num_experts, costs.expert_bytes), slots, pol, torch.device("cpu"), engine)
    pf = None
    if predictor is not None:
        pf = Prefetcher(cache, predictor, L, k, margin=margin, max_inflight=window, rank_depth=rank_depth)
    planner = StepPlanner(cache, pf, LaneDecision(cpu) if cpu is not None else None)
    lanes = VirtualLanes(clock, costs, cpu)
    bookkeeping = 0.0
    residual = torch.zeros(1, 1)  # [1, H]: recorded predictors do not read it
    for t in range(T):
        if pf is not None:
            pf.on_step(None, t, [0])  # the token's first layers, planned before its forward pass
        for l in range(L):
            clock.now += costs.attention
            lanes.compute += costs.attention
            if isinstance(pol, Belady):
                pol.step = t * L + l
            pred = None
            if pf is not None:  # the same calls, in the same order, as OffloadedExperts makes
                pf.on_residual(l, residual, t)
                pred = pf.predict(l)  # [n * depth] (host tensor)
                if predictor_seconds is not None:
                    clock.now += float(predictor_seconds[l])
                    lanes.compute += float(predictor_seconds[l])
            lanes.t_ids = clock.now  # the layer's ids are known: the CPU lane starts
            planner.run(l, routed_ids[t, l][None], pred.numpy() if pred is not None else None, lanes)  # [1, k]
            clock.now += costs.bookkeeping
            bookkeeping += costs.bookkeeping
            if on_step is not None:
                on_step(t, l)
        clock.now += costs.head
        lanes.compute += costs.head
    cache.stats.check()
    st = cache.stats.to_dict()
    st["late_hits"] = int(cache.late_hits.sum())
    if pf is not None:
        st.update(prefetch_issued=pf.issued, prefetch_cancelled=pf.cancelled,
                  prefetch_cancelled_inflight=pf.cancelled_inflight)
    return TimelineResult(T, clock.now, lanes.compute, float(cache.stats.stall_seconds.sum()), bookkeeping,
                          engine.busy_seconds, st, lanes.cpu_wait)
