"""The offload engine: host store, device slot cache, eviction policies, copy engines, prefetcher.

It sits between the model (which calls OffloadedExperts through its ExpertBackend boundary) and the
kernels (which read the slot pool); it imports nothing from the model but the observer base class.
Building blocks an embedder uses (see examples/embed_expert_cache.py):
    store = HostExpertStore(num_layers, num_experts, hidden, inter, dtype, pin=device.type == "cuda")
    store.put(layer, e, w1, w3, w2)
    cache = ExpertCache(store, num_slots, make_policy("lru"), device, make_copy_engine(device))
    experts = OffloadedExperts(cache, backend="loop" | "grouped_mm" | "triton")
    y = experts(layer, h [N, H], topk_ids [N, k], topk_weights [N, k])
"""

from .cache import ExpertCache
from .experts import OffloadedExperts
from .plan import CacheBudget, MemoryPlan, plan_memory
from .policy import LFU, LRU, POLICIES, EvictionPolicy, LRULayer, Predictive, make_policy
from .prefetch import Prefetcher
from .protocols import CopyEngine, ExpertStore, Key, Predictor
from .stats import CacheStats
from .store import HostExpertStore
from .cuda_link import CudaLinkEngine
from .engines import make_copy_engine
from .transfer import CopyFailed, CopyFaults, LoadHandle, ThreadCopyEngine

__all__ = ["CacheBudget", "CacheStats", "CopyEngine", "CopyFailed", "CopyFaults", 
           "CudaLinkEngine",            "EvictionPolicy", "ExpertCache", "ExpertStore", "HostExpertStore", "Key", "LFU", "LRU", "LRULayer",
           "LoadHandle", "MemoryPlan", "OffloadedExperts", "POLICIES", "Predictive", "Predictor", "Prefetcher",
           "ThreadCopyEngine", "make_copy_engine", "make_policy", "plan_memory"]
