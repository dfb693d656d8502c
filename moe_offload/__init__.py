"""moe_offload: run Mixtral-class Mixture-of-Experts models on one small GPU.

Public API:
    load(path=None, config=None, *, device=, dtype=, offload=, cache_per_layer=, predictor=, expert_dtype=)
        -> OffloadedModel
    OffloadConfig(...), Tuning(...): the validated settings; OffloadConfig.make(name=value, ...)
    OffloadedModel.generate(prompt, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, stream=False)
    OffloadedModel.logits(input_ids) -> Tensor [T, vocab]
    OffloadedModel.config -> ModelConfig
Every bad input raises MoeOffloadError with a message naming what is at fault.
"""

from .config import MixtralConfig, ModelConfig
from .errors import CheckpointError, ConfigError, MoeOffloadError
from .options import OffloadConfig, Tuning
from .generate import GenerationResult, GenerationStream
from .runtime import OffloadedModel, bundled_heldout_text, bundled_model_path, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "GenerationResult", "GenerationStream", "MixtralConfig", "ModelConfig",
           "MoeOffloadError", "OffloadConfig", "OffloadedModel", "Tuning", "bundled_heldout_text", "bundled_model_path", "load"]
