"""Mixtral (MixtralForCausalLM): softmax top-k always renormalised, an optional sliding window, the
experts as block_sparse_moe.experts.E.w1/w3/w2, and a tokenizer that prepends bos."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Family, check_every_layer_sparse
from .registry import register


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    experts_key, width_key = "num_local_experts", "intermediate_size"
    defaults = dict(rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2, norm_topk_prob=True)
    prepends_bos = True
    moe_prefix = "block_sparse_moe"
    expert_weights = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        check_every_layer_sparse(raw, source)  # transformers' Mixtral reads no attention_bias: none to refuse

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().fields(raw), "sliding_window": raw.get("sliding_window"), "norm_topk_prob": True}

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        eos = list(cfg.eos_token_ids)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "num_local_experts": cfg.num_local_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "hidden_act": self.hidden_act,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "sliding_window": cfg.sliding_window,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "torch_dtype": cfg.torch_dtype,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }


MIXTRAL = register(Mixtral())
