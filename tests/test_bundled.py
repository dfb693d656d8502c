"""The bundled model: loads everywhere (this runtime, transformers), generates the same greedy text."""

import json

import torch

import moe_offload
from moe_offload.checkpoint import Checkpoint
from moe_offload.options import OffloadConfig

PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]


def test_bundled_model_is_small_valid_and_documented():
    path = moe_offload.bundled_model_path()
    ckpt = Checkpoint(path)
    ckpt.validate()
    cfg = ckpt.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2) and cfg.num_hidden_layers >= 6
    assert (path / "model.safetensors").stat().st_size <= 16 * 1024 * 1024
    report = json.loads((path / "training_report.json").read_text())
    assert report["best_heldout_loss"] < 4.0  # a trained model, far below uniform (ln 4096 = 8.3)
    assert all(h > 2.5 for h in report["usage_entropy_bits"])  # balanced (3 bits = uniform over 8)
    assert moe_offload.bundled_heldout_text().stat().st_size > 100_000


def test_bundled_greedy_generation_equals_transformers():
    from transformers import MixtralForCausalLM

    path = moe_offload.bundled_model_path()
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    ours = moe_offload.load(device="cpu", dtype="float32", cache_per_layer=3)  # offloaded: 18 of 48 slots
    for prompt in PROMPTS:
        res = ours.generate(prompt, max_new_tokens=24)
        with torch.no_grad():
            out = hf.generate(torch.tensor([res.prompt_token_ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=list(ours.config.eos_token_ids), pad_token_id=0)
        assert res.token_ids == out[0, len(res.prompt_token_ids):].tolist(), prompt
        assert res.text.strip()
    assert ours.cache_stats()["misses"] > 0  # the cache really was exercised


def test_bundled_model_with_bundled_accelerator_is_exact():
    ref = moe_offload.load(device="cpu", offload=False)
    m = moe_offload.load(device="cpu", cache_per_layer=2, config=OffloadConfig.make(policy="predictive"))  # predictor auto -> m2r2
    res = m.generate(PROMPTS[0], max_new_tokens=24)
    assert res.stats["predictor"] == "m2r2"
    assert res.token_ids == ref.generate(PROMPTS[0], max_new_tokens=24).token_ids


def test_bundled_offloaded_equals_resident_across_capacities_and_policies():
    ref = moe_offload.load(device="cpu", offload=False)
    prompt = ref.encode(PROMPTS[1])
    ref_tokens = ref.generate(prompt, max_new_tokens=8).token_ids
    ref_logits = ref.logits(prompt)
    L, E, k = ref.config.num_hidden_layers, ref.config.num_local_experts, ref.config.num_experts_per_tok
    for slots in (k, 7, 2 * L, 4 * L, L * E - 1, L * E):
        for policy in ("lru", "lru-layer", "lfu", "predictive"):
            if policy == "lru-layer" and slots < k * L:
                continue
            m = moe_offload.load(device="cpu", config=OffloadConfig.make(cache_experts=slots, policy=policy))
            assert torch.equal(m.logits(prompt), ref_logits), (slots, policy)
            assert m.generate(prompt, max_new_tokens=8).token_ids == ref_tokens, (slots, policy)
