"""Expert offloading: host store, device slot cache, copy engine, eviction policies.

Building blocks an embedder uses (see examples/embed_expert_cache.py):
    store = HostExpertStore(num_layers, num_experts, hidden, inter, dtype, pin=device.type == "cuda")
    store.put(layer, e, w1, w3, w2)
    cache = ExpertCache(store, num_slots, make_policy("lru"), device, make_copy_engine(device))
    experts = OffloadedExperts(cache, backend="loop" | "grouped_mm" | "triton")
    y = experts(layer, h [N, H], topk_ids [N, k], topk_weights [N, k])
"""

from .cache import ExpertCache
from .offload import OffloadedExperts
from .plan import CacheBudget, MemoryPlan, plan_memory
from .policy import LFU, LRU, POLICIES, EvictionPolicy, LRULayer, Predictive, make_policy
from .stats import CacheStats
from .store import HostExpertStore
from .transfer import CopyEngine, CopyFailed, CopyFaults, CudaCopyEngine, ThreadCopyEngine, make_copy_engine

__all__ = ["CacheBudget", "CacheStats", "CopyEngine", "CopyFailed", "CopyFaults", "CudaCopyEngine",
           "EvictionPolicy", "ExpertCache", "HostExpertStore", "LFU", "LRU", "LRULayer", "MemoryPlan",
           "OffloadedExperts", "POLICIES", "Predictive", "ThreadCopyEngine", "make_copy_engine",
           "make_policy", "plan_memory"]
