"""Model families: one adapter per family (config fields, tensor names, router function) driving the one
family-neutral model core. Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5 (glm4_moe),
DeepSeek-V3 / R1 (deepseek_v3; Kimi-K2 as kimi_k2) and DeepSeek-V2 / V2-Lite (deepseek_v2), both with
multi-head latent attention, and GPT-OSS (gpt_oss: sinks, alternating sliding windows, experts with biases and
the clamped SwiGLU; its MXFP4 experts as published are parsed for `info` and `simulate` only).

    family = families.get(cfg.model_type)     # or cfg.family
    family.expert_name(layer, e, "w1"), family.layer_tensors(cfg, layer), family.routing(cfg)

A new family: one file here with a `Family` subclass that ends with `register(...)`, imported below.
"""

from .base import EXPERT_WEIGHTS, Family
from .registry import find, get, register, supported, unregister
from .routing import Routing

from . import deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: E402,F401  (each registers its family)

__all__ = ["EXPERT_WEIGHTS", "Family", "Routing", "find", "get", "register", "supported", "unregister"]
