"""moe_offload.integrations.transformers.offload: transformers' own generate with offloaded experts gives
the untouched model's tokens (and logits within float32 rounding) for each supported family."""

import copy

import pytest
import torch
import transformers

from moe_offload.errors import MoeOffloadError
from moe_offload.integrations.transformers import CachedExperts, offload

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)


def _model(family: str):
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=96, num_local_experts=8, **COMMON)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=96, num_experts=16,
                                          head_dim=16, norm_topk_prob=False, **COMMON)
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=48, intermediate_size=96, num_experts=8,
                                          shared_expert_intermediate_size=80, **COMMON)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=48, num_experts=8, clip_qkv=4.0, **COMMON)
        cls = transformers.OlmoeForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # random init is tiny for some families: make routing and outputs non-trivial
        for n, p in model.named_parameters():
            if "experts" in n or n.endswith("gate.weight"):
                p.normal_(0, 0.2)
    return model


IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 120, 7, 33]])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("per_layer,policy", [(2, "lru"), (3, "lfu"), (5, "lru-layer")])
def test_offloaded_transformers_model_generates_the_same_tokens(family, per_layer, policy):
    ref = _model(family)
    with torch.no_grad():
        want_logits = ref(IDS).logits
    want = ref.generate(IDS, max_new_tokens=12, do_sample=False)
    model = copy.deepcopy(ref)
    handle = offload(model, cache_per_layer=per_layer, policy=policy)
    assert all(isinstance(b.mlp.experts if hasattr(b, "mlp") else b.block_sparse_moe.experts, CachedExperts)
               for b in model.model.layers)
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got_logits = model(IDS).logits
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    handle.reset_stats()
    got = model.generate(IDS, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()
    st = model.moe_offload.stats()
    assert st["misses"] > 0 and st["hits"] + st["misses"] == st["uses"] and st["bytes_h2d"] > 0
    assert st["capacity_slots"] == per_layer * 3
    handle.close()


def test_offload_refuses_what_it_cannot_do():
    with pytest.raises(MoeOffloadError, match="LlamaForCausalLM is not supported"):
        offload(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    model = _model("mixtral")
    with pytest.raises(MoeOffloadError, match="cache_per_layer must be an integer in \\[2, 8\\]"):
        offload(model, cache_per_layer=1)
    with pytest.raises(MoeOffloadError, match="policy must be one of"):
        offload(model, policy="fifo")
    with pytest.raises(MoeOffloadError, match="at most one"):
        offload(model, cache_per_layer=2, cache_experts=8)
    offload(model, cache_per_layer=2).close()
    with pytest.raises(MoeOffloadError, match="offloaded already"):
        offload(model)


@pytest.mark.parametrize("slots,policy", [(2, "lru"), (2, "predictive"), (4, "lfu")])
def test_a_total_capacity_below_top_k_times_layers_still_gives_the_same_tokens(slots, policy):
    # 3 layers x top-2 = 6 experts per token; 2 or 4 slots over all layers force evictions within a token.
    ref = _model("mixtral")
    want = ref.generate(IDS, max_new_tokens=8, do_sample=False)
    model = copy.deepcopy(ref)
    handle = offload(model, cache_experts=slots, policy=policy)
    handle.reset_stats()
    got = model.generate(IDS, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    st = handle.stats()
    assert st["capacity_slots"] == slots and st["policy"] == policy
    # every decode step needs >= 6 distinct (layer, expert) uses and only `slots` fit: misses every step
    assert st["misses"] >= 8 * 3 * 2 - slots and st["bytes_h2d"] == st["misses"] * handle.cache.store.expert_bytes
    handle.close()


def test_the_original_expert_parameters_are_freed():
    import gc
    import weakref

    model = _model("mixtral")
    old = [weakref.ref(layer.mlp.experts.gate_up_proj) for layer in model.model.layers]
    old += [weakref.ref(layer.mlp.experts.down_proj) for layer in model.model.layers]
    offload(model, cache_per_layer=2).close()
    gc.collect()
    assert all(r() is None for r in old), "offload left a reference to the model's expert weights"
