"""Tiny random Mixtral checkpoints written by transformers itself (the parity oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_offload import MixtralConfig
from moe_offload.checkpoint import expected_tensors, save_checkpoint

# Shapes chosen to cover: odd sizes, 1 and 2 layers, GQA and MHA, top-1 and top-2, tied and untied
# embeddings, a sliding window shorter than the test sequences, and a sharded checkpoint.
SHAPES = {
    "odd_gqa": dict(hidden_size=36, intermediate_size=22, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, vocab_size=97),
    "one_layer_top1_tied": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                num_experts_per_tok=1, vocab_size=64, tie_word_embeddings=True),
    "window_top2": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=80,
                        sliding_window=7),
    "sharded": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=70,
                    max_shard_size="40KB"),
}


def make_hf_checkpoint(path: Path, max_shard_size: str | None = None, **kw):
    """Build a random MixtralForCausalLM, save it with save_pretrained, return the (eval) model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    # The eager (per-expert loop) experts path is the oracle; the grouped_mm path needs 16-byte strides.
    cfg = dict(experts_implementation="eager", max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, sliding_window=None)
    cfg.update(kw)
    model = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    # Norm weights are ones at init; perturb them so a wrong norm shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def edit_config(path: Path, **changes) -> None:
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


# A small model written by this project's own saver (fast; no transformers needed).
CFG = MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                    num_experts_per_tok=2, head_dim=8, max_position_embeddings=32, torch_dtype="float32")


def write_model(path: Path, cfg: MixtralConfig = CFG, seed: int = 0, **kw) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 0.1 for n, s in expected_tensors(cfg).items()}
    save_checkpoint(path, cfg, tensors, **kw)
    return path
