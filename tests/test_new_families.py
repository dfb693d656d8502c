"""The 2026 families: GLM-4.5 (glm4_moe) runs, exact against transformers' Glm4MoeForCausalLM on a tiny
random checkpoint (dense first layer, partial rotary, q/k norm, q/k/v biases, sigmoid routing with the
correction bias and groups, scaled, an ungated shared expert; offloaded equal to resident); GPT-OSS and
the FP8 DeepSeek-V3 as published are parsed for `info` and `simulate` (published parameter counts) and
refused by load() (DeepSeek itself runs: tests/test_deepseek.py)."""

import json
from pathlib import Path

import pytest
import torch

import moe_offload
from moe_offload.config import ModelConfig
from moe_offload.options import OffloadConfig
from helpers import decode_logits, rel_err

FIXTURES = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"  # the published configs, shipped
REL_TOL = 2e-5  # as tests/test_families.py (float32)
L, K_DENSE, E, K = 3, 1, 8, 3  # 3 layers, the first dense: 2 MoE layers of 8 experts, top-3
M = L - K_DENSE
GLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
           num_key_value_heads=2, head_dim=12, moe_intermediate_size=20, n_routed_experts=E, num_experts_per_tok=K,
           n_shared_experts=1, first_k_dense_replace=K_DENSE, n_group=4, topk_group=2, routed_scaling_factor=2.5,
           attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, norm_topk_prob=True,
           max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
           tie_word_embeddings=False)






def build_glm(path: Path, **overrides):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Glm4MoeConfig(**{**GLM, **overrides, "experts_implementation": "eager"})
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # norms ones, biases and the correction bias zero at init: perturb so mistakes show
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):  # q/k/v biases and e_score_correction_bias
                p.normal_(0.0, 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm4_moe")
    return path, build_glm(path)


IDS = torch.randint(3, 64, (20,), generator=torch.Generator().manual_seed(1)).tolist()


def test_glm_config_fields(glm):
    path, _ = glm
    cfg = ModelConfig.from_file(path / "config.json")  # transformers 5 spelling: rope_parameters
    assert (cfg.first_k_dense_replace, cfg.num_moe_layers, cfg.dense_intermediate_size) == (1, 2, 48)
    assert (cfg.scoring, cfg.correction_bias, cfg.n_group, cfg.topk_group) == ("sigmoid", True, 4, 2)
    assert (cfg.partial_rotary_factor, cfg.rotary_dim, cfg.qk_norm, cfg.qkv_bias) == (0.5, 6, "per_head", True)
    assert cfg.shared_expert_intermediate_size == 20 and cfg.routed_scaling_factor == 2.5
    air = ModelConfig.from_file(FIXTURES / "glm-4.5-air.config.json")  # the hub spelling: top-level keys
    assert (air.partial_rotary_factor, air.qk_norm, air.first_k_dense_replace, air.mtp_layers) == (0.5, "none", 1, 1)


def test_glm_prefill_and_decode_logits_match_transformers(glm):
    path, hf = glm
    m = moe_offload.load(path, device="cpu", dtype="float32")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert rel_err(m.logits(IDS), ref) < REL_TOL
    assert rel_err(decode_logits(m, IDS, 12), ref) < REL_TOL


def test_glm_greedy_tokens_match_transformers(glm):
    path, hf = glm
    m = moe_offload.load(path, device="cpu", dtype="float32")
    prompt = [1, 5, 9, 17, 33]
    ours = m.generate(prompt, max_new_tokens=24)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          eos_token_id=list(m.config.eos_token_ids), pad_token_id=0)
    assert ours.token_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_glm_offloaded_equals_resident_at_several_capacities(glm, predictor):
    """The engine indexes the 2 MoE layers compactly: the dense first layer and the shared expert never
    enter the store or the cache."""
    path, _ = glm
    resident = moe_offload.load(path, device="cpu", dtype="float32")
    ref_prefill, ref_decode = resident.logits(IDS), decode_logits(resident, IDS, 12)
    ref_tokens = resident.generate(IDS[:6], max_new_tokens=8).token_ids
    for cap in (K, E, M * E // 2 + 1, M * E):
        m = moe_offload.load(path, device="cpu", dtype="float32",
                             config=OffloadConfig.make(cache_experts=cap, predictor=predictor))
        assert m.expert_cache.num_slots == cap
        assert (m.expert_cache.store.num_layers, m.expert_cache.store.num_experts) == (M, E)
        assert torch.equal(m.logits(IDS), ref_prefill), cap
        assert torch.equal(decode_logits(m, IDS, 12), ref_decode), cap
        assert m.generate(IDS[:6], max_new_tokens=8).token_ids == ref_tokens, cap


def test_glm_mtp_layer_tensors_are_ignored(tmp_path, glm):
    """A shipped checkpoint carries its MTP layer as model.layers.{L}.*: not run, not an error."""
    from safetensors.torch import load_file, save_file

    src, _ = glm
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    t = load_file(str(tmp_path / "model.safetensors"))
    t[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(32, 64)
    t[f"model.layers.{L}.mlp.experts.0.up_proj.weight"] = torch.zeros(20, 32)
    save_file(t, str(tmp_path / "model.safetensors"))
    m = moe_offload.load(tmp_path, device="cpu", dtype="float32")
    assert torch.equal(m.logits(IDS), moe_offload.load(src, device="cpu", dtype="float32").logits(IDS))


def test_glm_router_bias_stays_float32_in_half_precision(glm):
    path, _ = glm
    m = moe_offload.load(path, device="cpu", dtype="bfloat16")
    assert m.model.moe_layers[0].router_bias.dtype == torch.float32 and m.model.layers[0].gate is None


# --- projections for the real sizes -----------------------------------------------------------------
# Published totals / active: DeepSeek-V3 671B / 37B (both embedding tables counted as active); GLM-4.5-Air
# 106B / 12B (Z.ai's active count leaves out the embedding and the LM head); GPT-OSS (OpenAI's model card:
# 116.83B / 5.13B and 20.91B / 3.61B, active without the input embedding). The MTP layers are not counted.
@pytest.mark.parametrize("name, total_b, active_b, active_kind", [
    ("deepseek-v3", 671.0, 37.0, "active_per_token"),
    ("glm-4.5-air", 106.0, 12.0, "active_without_embeddings_and_head"),
    ("gpt-oss-120b", 116.83, 5.13, "active_non_embedding"),
    ("gpt-oss-20b", 20.91, 3.61, "active_non_embedding"),
])
def test_published_parameter_counts_within_two_percent(name, total_b, active_b, active_kind):
    from moe_offload.info import describe

    p = describe(None, config_file=FIXTURES / f"{name}.config.json")["params"]
    assert abs(p["total"] / 1e9 / total_b - 1) < 0.01, p
    assert abs(p[active_kind] / 1e9 / active_b - 1) < 0.02, p


def test_deepseek_v3_mla_sizes_and_kv_bytes():
    cfg = ModelConfig.from_file(FIXTURES / "deepseek-v3.config.json")
    assert (cfg.attention, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.head_dim) == ("mla", 1536, 512, 192)
    assert (cfg.first_k_dense_replace, cfg.num_moe_layers, cfg.shared_expert_intermediate_size) == (3, 58, 2048)
    h, nh = 7168, 128
    attn = h * 1536 + 1536 + 1536 * nh * 192 + h * (512 + 64) + 512 + 512 * nh * 256 + nh * 128 * h
    assert cfg.attention_params == attn
    assert cfg.kv_elements_per_token * 2 == (512 + 64) * 61 * 2  # the latent + the rope key, bf16
    r = cfg.family.routing(cfg)
    assert (r.scoring, r.n_group, r.topk_group, r.scale, r.renormalize) == ("sigmoid", 8, 4, 2.5, True)


def test_shipped_expert_bytes():
    from moe_offload.info import expert_bytes

    gpt = expert_bytes(ModelConfig.from_file(FIXTURES / "gpt-oss-120b.config.json"))
    h = i = 2880
    assert gpt["mxfp4 (shipped)"] == 3 * h * i // 2 + 3 * h * i // 32 + 2 * (2 * i + h)
    ds = expert_bytes(ModelConfig.from_file(FIXTURES / "deepseek-v3.config.json"))
    assert ds["fp8_block128 (shipped)"] == 3 * 7168 * 2048 + 4 * 3 * 56 * 16


@pytest.mark.parametrize("name", ["deepseek-v3", "glm-4.5-air", "gpt-oss-120b", "gpt-oss-20b"])
def test_info_and_simulate_cli_accept_the_published_configs(name, glm, tmp_path, capsys):
    from moe_offload.analysis.trace import record_routing, save_trace
    from moe_offload.cli import main

    cfg_file = FIXTURES / f"{name}.config.json"
    assert main(["info", "--config", str(cfg_file)]) in (0, None)
    out = capsys.readouterr().out
    assert "params" in out and "runnable   no" not in out  # DeepSeek-V3's FP8: tests/test_fp8_published.py
    path, _ = glm  # a routing trace of the tiny GLM (any trace projects onto the real shapes)
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    ids = torch.randint(3, 64, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    save_trace(tmp_path / "t.npz", record_routing(m.model, ids, window=32), {})
    assert main(["simulate", "--trace", str(tmp_path / "t.npz"), "--hardware", "h100-pcie5", "--model-config",
                 str(cfg_file), "--expert-dtype", "int4", "--predictor", "none", "--json"]) in (0, None)
    res = json.loads(capsys.readouterr().out)
    assert res["tokens_per_second"] > 0 and res["settings"]["model_layers"] == json.loads(cfg_file.read_text())["num_hidden_layers"]


def test_predictor_scores_rank_the_routed_set_as_the_sigmoid_grouped_router_chooses(glm):
    """next-gate's scores (predictors.router_probs) on a layer's own residual: their top-k is exactly the
    set that layer routes to (sigmoid + correction bias + groups), where a softmax ranking would differ."""
    from moe_offload.model.layers import rms_norm
    from moe_offload.model.observers import Observer, observing
    from moe_offload.predict.predictors import router_probs

    path, _ = glm
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    seen = {}

    class Rec(Observer):
        def on_residual(self, layer, x, start_pos):
            seen.setdefault(layer, {})["x"] = x.clone()

        def on_routing(self, layer, ids, weights, logits, start_pos):
            seen[layer]["ids"] = ids.clone()

    with observing(m.model, Rec()), torch.inference_mode():
        m.model(torch.tensor([IDS]))
        assert sorted(seen) == list(range(M))
        differs = 0
        for layer, rec in seen.items():
            h = rms_norm(rec["x"], m.model.moe_layers[layer].post_attention_layernorm, m.config.rms_norm_eps)
            scores = router_probs(m.model, layer, h)
            got = scores.topk(K, dim=-1).indices.sort(-1).values
            assert torch.equal(got, rec["ids"].sort(-1).values)
            soft = torch.softmax(torch.nn.functional.linear(h, m.model.moe_layers[layer].gate), -1)
            differs += int((soft.topk(K, -1).indices.sort(-1).values != got).any(-1).sum())
        assert differs > 0  # the softmax ranking (the former predictor) misses some of them


def test_untrained_m2r2_ranks_as_the_sigmoid_grouped_router_chooses(glm):
    """m2r2's scores for a sigmoid router are the target layer's bias-corrected sigmoid with the groups
    outside the best ones at -inf, as next-gate's: untrained adapters (B = 0) give next-gate's scores."""
    from moe_offload.predict import Accelerator, M2R2Predictor, NextGate

    path, _ = glm
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    acc = Accelerator(GLM["hidden_size"], M, [1], rank=4)
    x = torch.randn(6, GLM["hidden_size"])
    a, b = M2R2Predictor(m.model, acc, 1).scores(0, x), NextGate(m.model, 1).scores(0, x)
    assert torch.isinf(b).any()  # the groups left out (n_group 4, topk_group 2)
    torch.testing.assert_close(a, b)


def test_m2r2_trains_saves_and_keeps_outputs_exact_for_sigmoid_routing(glm, tmp_path):
    from moe_offload.predict import model_fingerprint
    from moe_offload.predict.train import train_accelerator

    path, _ = glm
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    ids = torch.randint(3, 64, (640,), generator=torch.Generator().manual_seed(3)).tolist()
    acc, report = train_accelerator(m.model, ids, lookaheads=[1], rank=4, epochs=2, window=32, show_progress=False)
    before, after = report["heldout_before"], report["heldout_after"]
    assert before["recall"]["m2r2"]["d1"] == before["recall"]["next-gate"]["d1"]  # untrained == next-gate
    assert after["loss"] < before["loss"]
    f = tmp_path / "acc.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model), "model": str(path)})
    ref = m.generate(IDS[:6], max_new_tokens=8).token_ids
    off = moe_offload.load(path, device="cpu", dtype="float32", predictor="m2r2",
                           config=OffloadConfig.make(cache_experts=K + 1, accelerator=f))
    assert off.generate(IDS[:6], max_new_tokens=8).token_ids == ref


@pytest.mark.parametrize("kw", [dict(peek=True), dict(cross_token=True)])
def test_m2r2_peek_and_cross_token_train_past_the_dense_first_layer(glm, kw):
    """Attention peek fits expert stand-ins to the MoE layers only (the dense first layer has no router);
    cross-token heads rank the next token's layers with their own correction bias and groups."""
    from moe_offload.predict import M2R2Predictor
    from moe_offload.predict.train import train_accelerator

    path, _ = glm
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    ids = torch.randint(3, 64, (320,), generator=torch.Generator().manual_seed(4)).tolist()
    acc, report = train_accelerator(m.model, ids, lookaheads=[1, 2], rank=4, epochs=1, window=32,
                                    show_progress=False, **kw)
    assert report["heldout_after"]["loss"] < report["heldout_before"]["loss"]
    s = M2R2Predictor(m.model, acc, 2).scores(M - 1, torch.randn(3, GLM["hidden_size"]))
    assert s.isnan().all() if "peek" in kw else torch.isinf(s).any()  # cross heads: groups left out


# --- top-8 of 128 experts: m2r2 against next-gate at d = 1, 2, 3 -------------------------------------
# Tiny random models (hidden 64, 4 MoE layers, 128 experts top-8, experts 8 wide) on 3200 random token
# ids; adapters trained on 90% (rank 16, 3 epochs, no context: random ids carry none), recall on the
# rest. Random weights: the numbers say whether training finds the residual's drift, not what a trained
# model's recall would be. (A random Mixtral written by this project's saver, norm weights ~N(0, 0.1),
# is left out: next-gate already reads 0.83 at d=1 there and the adapters do not beat it.)
TOP8 = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=8, num_experts_per_tok=8, norm_topk_prob=True,
            max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, experts_implementation="eager")


def build_top8(path: Path, family: str) -> None:
    import transformers

    torch.manual_seed(0)
    if family == "qwen3_moe":  # softmax reference
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **TOP8, num_hidden_layers=4, num_experts=128)).eval()
    elif family == "deepseek_v3":  # as GLM below, with multi-head latent attention (q-LoRA)
        kw = {k: v for k, v in TOP8.items() if k not in ("head_dim", "experts_implementation")}
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            **kw, num_hidden_layers=5, n_routed_experts=128, n_shared_experts=1, first_k_dense_replace=1, n_group=8,
            topk_group=4, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16)).eval()
    elif family == "gpt_oss":  # top-4 of 128, softmax over the chosen logits; router and expert biases, sinks
        kw = {k: v for k, v in TOP8.items() if k not in ("moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob",
                                                      "intermediate_size", "experts_implementation")}
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **kw, intermediate_size=8, num_hidden_layers=4, num_local_experts=128, num_experts_per_tok=4,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)).eval()
    else:  # GLM-4.5 shaped: a dense first layer, a shared expert, sigmoid + correction bias, 8 groups, best 4
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
            **TOP8, num_hidden_layers=5, n_routed_experts=128, n_shared_experts=1, first_k_dense_replace=1,
            n_group=8, topk_group=4, routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
            partial_rotary_factor=0.5)).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05)
            elif name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize("family,top_k", [("qwen3_moe", 8), ("glm4_moe", 8), ("deepseek_v3", 8), ("gpt_oss", 4)])
def test_m2r2_top8_of_128_recall_beats_next_gate_at_d123(family, top_k, tmp_path):
    from moe_offload.predict.train import train_accelerator

    build_top8(tmp_path, family)
    m = moe_offload.load(tmp_path, device="cpu", dtype="float32", offload=False)
    assert (m.config.num_local_experts, m.config.num_experts_per_tok, m.config.num_moe_layers) == (128, top_k, 4)
    ids = torch.randint(3, 128, (3200,), generator=torch.Generator().manual_seed(0)).tolist()
    _, report = train_accelerator(m.model, ids, lookaheads=[1, 2, 3], rank=16, epochs=3, lr=1e-2, window=64,
                                  show_progress=False, context=False)
    before, after = report["heldout_before"]["recall"], report["heldout_after"]["recall"]
    rows = {d: (before["next-gate"][d]["top_k"], after["m2r2"][d]["top_k"]) for d in ("d1", "d2", "d3")}
    print(f"\n{family} ({m.config.scoring}) top-8 recall, next-gate -> m2r2: "
          + ", ".join(f"{d} {ng:.3f} -> {m2:.3f}" for d, (ng, m2) in rows.items()))
    for d, (ng, m2) in rows.items():
        assert before["m2r2"][d] == before["next-gate"][d]  # untrained == next-gate
        assert m2 > ng + 0.03, (d, ng, m2)


def test_glm_int8_experts_offloaded_equal_resident(glm):
    path, _ = glm
    packed = moe_offload.load(path, device="cpu", dtype="float32", expert_dtype="int8", offload=False)
    off = moe_offload.load(path, device="cpu", dtype="float32",
                           config=OffloadConfig.make(expert_dtype="int8", cache_experts=K + 1))
    ref = moe_offload.load(path, device="cpu", dtype="float32").logits(IDS)
    assert torch.equal(off.logits(IDS), packed.logits(IDS)) and rel_err(packed.logits(IDS), ref) < 0.1  # int8 rounding on a tiny model
