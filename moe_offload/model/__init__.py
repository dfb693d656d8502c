"""The dense part of the model, the MoE boundary and the per-layer observers."""

from .moe import ExpertBackend, ResidentExperts, route
from .observers import ForcedRouting, LayerObserver, Observer, UsageCounter, observing
from .transformer import KVCache, MixtralTransformer, MoeModel

__all__ = ["ExpertBackend", "ForcedRouting", "KVCache", "LayerObserver", "MixtralTransformer", "MoeModel", "Observer",
           "ResidentExperts", "UsageCounter", "observing", "route"]
