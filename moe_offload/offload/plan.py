"""Memory plan: how many expert slots fit the budget, after dense weights, KV cache and a reserve."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import MoeOffloadError
from ..formats import DEFAULT_GROUP_SIZE, ExpertFormat
from ..validate import integer, real
from .store import HOST_RAM_MARGIN, as_format, available_host_bytes

GB = 1e9
# Kept free on the device for activations, the allocator and CUDA itself.
RESERVE_MIN_BYTES = 1 << 30
RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class CacheBudget:
    """At most one of: total slots, slots per layer, or gigabytes of slots. None of them: fill the device."""

    cache_experts: int | None = None
    cache_per_layer: int | None = None
    cache_gb: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("cache_experts", "cache_per_layer", "cache_gb") if getattr(self, n) is not None]
        if len(given) > 1:
            raise MoeOffloadError(f"give at most one cache budget, got {', '.join(given)}")
        for name in ("cache_experts", "cache_per_layer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, integer(name, getattr(self, name), 0))  # frozen; 0 is refused by the plan
        if self.cache_gb is not None:
            object.__setattr__(self, "cache_gb", real("cache_gb", self.cache_gb, 0.0, lo_open=True))


@dataclass
class MemoryPlan:
    device: str
    dense_bytes: int
    kv_cache_bytes: int
    expert_bytes: int
    slots: int
    slot_bytes: int
    reserve_bytes: int
    free_bytes: int
    host_store_bytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        def gb(n: int) -> str:
            return f"{n / GB:8.3f} GB"

        lines = [f"memory plan on {self.device}:",
                 f"  dense weights   {gb(self.dense_bytes)}",
                 f"  KV cache        {gb(self.kv_cache_bytes)}",
                 f"  expert slots    {gb(self.slot_bytes)}  ({self.slots} slots x {self.expert_bytes / 1e6:.1f} MB)",
                 f"  reserve         {gb(self.reserve_bytes)}",
                 f"  free now        {gb(self.free_bytes)}",
                 f"  host store      {gb(self.host_store_bytes)}  (all experts, host RAM)"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def device_reserve_bytes(total: int) -> int:
    """Bytes kept free on a device of `total` bytes (the memory plan's and the simulator's one rule)."""
    return max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * total))


def free_device_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device; for cpu, available host RAM (psutil)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    avail = available_host_bytes()
    return avail, avail


def plan_memory(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                budget: CacheBudget, per_layer_policy: bool, expert_fmt: ExpertFormat | str | None = None,
                group_size: int = DEFAULT_GROUP_SIZE) -> MemoryPlan:
    """Resolve the budget into a slot count, checking it against the device's free memory.
    expert_fmt: the experts' format (an ExpertFormat or its name; None: experts in `dtype`)."""
    item = torch.tensor([], dtype=dtype).element_size()
    L, E, k = cfg.num_moe_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    fmt = as_format(expert_fmt, group_size, dtype)
    expert_bytes = fmt.expert_bytes(cfg.hidden_size, cfg.intermediate_size)  # one slot: the largest layer's expert
    dense = cfg.dense_params * item
    kv = cfg.kv_elements_per_token * max_seq_len * item
    try:
        layers = fmt.per_layer(L)
    except ValueError as exc:
        raise MoeOffloadError(str(exc)) from None
    store = E * sum(f.expert_bytes(cfg.hidden_size, cfg.intermediate_size) for f in layers)
    free, total = free_device_bytes(device)
    if device.type == "cpu":
        free -= store  # on cpu the host store and the "device" slots share the same RAM
    reserve = device_reserve_bytes(total)
    room = free - dense - kv - reserve
    notes: list[str] = []
    if budget.cache_experts is not None:
        slots = budget.cache_experts
    elif budget.cache_per_layer is not None:
        if budget.cache_per_layer < k:
            raise MoeOffloadError(f"cache_per_layer {budget.cache_per_layer} is below the minimum {k} (top_k={k})")
        if budget.cache_per_layer > E:
            notes.append(f"cache_per_layer {budget.cache_per_layer} clamped to {E}: every expert fits")
        slots = min(budget.cache_per_layer, E) * L
    elif budget.cache_gb is not None:
        want = int(budget.cache_gb * GB)
        if want > room:
            raise MoeOffloadError(
                f"cache_gb {budget.cache_gb:g} ({want:,} bytes) exceeds what is free on {device}: {free:,} bytes "
                f"free minus dense weights {dense:,}, KV cache {kv:,} and reserve {reserve:,} leaves {room:,}")
        slots = want // expert_bytes
    else:
        slots = max(0, room) // expert_bytes
        notes.append(f"default budget: free memory minus dense weights, KV cache and a {reserve / GB:.2f} GB reserve")
    minimum = k * L if per_layer_policy else k
    if slots < minimum:
        what = f"top_k={k} per layer x {L} layers (per-layer policy)" if per_layer_policy else f"top_k={k}"
        raise MoeOffloadError(f"expert cache capacity {slots} slots is below the minimum {minimum} ({what}); "
                              f"one expert is {expert_bytes:,} bytes")
    if slots > L * E:
        notes.append(f"capacity {slots} slots clamped to {L * E}: every expert fits on the device")
        slots = L * E
    if budget.cache_gb is None and slots * expert_bytes > max(room, 0):
        notes.append(f"the requested {slots} slots need {slots * expert_bytes:,} bytes but only "
                     f"{max(room, 0):,} are free after dense weights, KV cache and reserve")
        if device.type == "cuda":
            raise MoeOffloadError(f"expert cache of {slots} slots ({slots * expert_bytes:,} bytes) does not fit "
                                  f"on {device}: {max(room, 0):,} bytes free after dense weights, KV cache "
                                  f"and reserve")
    return MemoryPlan(device=str(device), dense_bytes=dense, kv_cache_bytes=kv, expert_bytes=expert_bytes,
                      slots=slots, slot_bytes=slots * expert_bytes, reserve_bytes=reserve, free_bytes=free,
                      host_store_bytes=store, notes=notes)


def check_load_ram(cfg: ModelConfig, fmt: ExpertFormat, dtype: torch.dtype, device: torch.device, offload: bool,
                   mapped: bool) -> None:
    """Refuse, before anything is allocated, a load whose host-resident bytes exceed the RAM available
    (psutil, less the store's margin): the experts copied into host RAM (the host store when offloading
    or storing them packed; the model itself on cpu), none when `mapped` (a GGUF file read in place: its
    store warns instead when larger than RAM), plus the dense weights when they live on the cpu."""
    if mapped:
        return
    per_expert = [f.expert_bytes(cfg.hidden_size, cfg.intermediate_size) for f in fmt.per_layer(cfg.num_moe_layers)]
    experts = cfg.num_local_experts * sum(per_expert) if (offload or fmt.quantized or device.type == "cpu") else 0
    dense = cfg.dense_params * torch.tensor([], dtype=dtype).element_size() if device.type == "cpu" else 0
    need, avail = experts + dense, available_host_bytes()
    if need <= avail - HOST_RAM_MARGIN:
        return
    hint = ""
    if not fmt.quantized:
        from ..formats import get_format

        int4 = cfg.num_local_experts * cfg.num_moe_layers * get_format("int4").expert_bytes(cfg.hidden_size,
                                                                                           cfg.intermediate_size)
        hint = f" (int4 experts take {int4 / GB:.1f} GB)"
    raise MoeOffloadError(
        f"not enough host RAM to load this model: it needs {need / GB:.1f} GB (experts copied into RAM as {fmt.name} "
        f"{experts / GB:.1f} GB + dense weights on the host {dense / GB:.1f} GB), {avail / GB:.1f} GB is available "
        f"({HOST_RAM_MARGIN / GB:.2f} GB kept free); pass a quantized expert_dtype{hint}, or load a GGUF file, whose "
        "experts are read in place from its memory map")
