"""The dense part of the model and the MoE boundary."""

from .moe import ExpertBackend, ResidentExperts, expert_ffn, moe_loop, route
from .transformer import KVCache, MixtralTransformer

__all__ = ["ExpertBackend", "KVCache", "MixtralTransformer", "ResidentExperts", "expert_ffn", "moe_loop",
           "route"]
