"""DeepSeek-V3 (and Kimi-K2) and DeepSeek-V2 with and without q-LoRA run, exact against transformers'
DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on tiny random checkpoints: multi-head latent attention over
a cache of latents (prefill expanded, decode absorbed), yarn RoPE with its mscale corrections, each
generation's rope layout, dense first layers, ungated shared experts, V3's sigmoid grouped router with the
correction bias and V2's softmax routers (greedy and group_limited_greedy); offloaded equal to resident,
batched equal to solo, the CLI, bfloat16."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import moe_offload
from moe_offload import ConfigError
from moe_offload.config import ModelConfig
from moe_offload.options import OffloadConfig
from helpers import decode_logits, rel_err

ASSETS = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"
REL_TOL = 1e-4  # float32; measured 2e-7..1.5e-6
L, K_DENSE, E, K = 3, 1, 8, 3  # 3 layers, the first dense: 2 MoE layers of 8 routed experts, top-3
M = L - K_DENSE
R, DR = 16, 8  # kv_lora_rank, qk_rope_head_dim
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=L,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=E,
              kv_lora_rank=R, qk_rope_head_dim=DR, v_head_dim=12, qk_nope_head_dim=12, num_experts_per_tok=K,
              first_k_dense_replace=K_DENSE, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
# The published V3's rope_scaling (factor 40, mscale 1 / 1: the cos/sin tables unscaled, the softmax scale
# times mscale^2 = 1.87) over a short pretraining context, so the ramp crosses the 4 rope frequencies.
V3_YARN = dict(type="yarn", factor=40, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=64,
               beta_fast=32, beta_slow=1)
# V2 with mscale != mscale_all_dim: the tables scale by mscale(0.707) / mscale(0.8) as well
V2_YARN = dict(type="yarn", factor=40, mscale=0.707, mscale_all_dim=0.8, original_max_position_embeddings=64,
               beta_fast=32, beta_slow=1)
VARIANTS = {
    "v3": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              norm_topk_prob=True, rope_scaling=V3_YARN)),
    "v2": ("DeepseekV2", dict(q_lora_rank=24, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                              routed_scaling_factor=16.0, rope_scaling=V2_YARN)),
    "v2_lite": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2)),  # plain q_proj
}
IDS = torch.randint(3, 64, (20,), generator=torch.Generator().manual_seed(1)).tolist()
PROMPT = [1, 5, 9, 17, 33]


def build(path: Path, variant: str):
    import transformers

    arch, kw = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(**{**COMMON, **kw, "experts_implementation": "eager"})
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # norms ones and the correction bias zero at init: perturb so mistakes show
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (path, build(path, variant))
    return out


def test_config_fields(models):
    v3 = ModelConfig.from_file(models["v3"][0] / "config.json")  # transformers 5 spelling: rope_parameters
    assert (v3.attention, v3.q_lora_rank, v3.kv_lora_rank, v3.head_dim, v3.rotary_dim) == ("mla", 24, R, 20, DR)
    assert (v3.rope_type, v3.rope_factor, v3.rope_original_max_position, v3.rope_mscale_all_dim) == ("yarn", 40, 64, 1)
    assert v3.rope_interleave and (v3.scoring, v3.correction_bias, v3.num_moe_layers) == ("sigmoid", True, M)
    v2 = ModelConfig.from_file(models["v2"][0] / "config.json")
    r = v2.family.routing(v2)
    assert (r.scoring, r.n_group, r.topk_group, r.group_score, r.renormalize, r.scale) == (
        "softmax", 4, 2, "max", False, 16)
    lite = ModelConfig.from_file(models["v2_lite"][0] / "config.json")
    assert (lite.q_lora_rank, lite.rope_type, lite.n_group, lite.shared_expert_intermediate_size) == (
        0, "default", 1, 32)
    v3_hub = ModelConfig.from_file(ASSETS / "deepseek-v3.config.json")  # the hub spelling: rope_scaling, type
    assert (v3_hub.rope_factor, v3_hub.rope_original_max_position, v3_hub.rope_mscale) == (40, 4096, 1.0)
    for cfg in (v3, v2, lite, v3_hub):  # to_hf_dict: what from_dict reads
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_logits_match_transformers(models, variant):
    """Prefill expands keys and values from the cached latents; decode attends in latent space (absorbed);
    a second prefill chunk after cached positions expands the whole cache."""
    path, hf = models[variant]
    m = moe_offload.load(path, device="cpu", dtype="float32")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    prefill, decode = m.logits(IDS), decode_logits(m, IDS, 3)
    with torch.inference_mode():
        chunks = torch.cat([m.model(torch.tensor([IDS[:7]]), 0, m.kv_cache)[0],
                            m.model(torch.tensor([IDS[7:]]), 7, m.kv_cache)[0]])
    errs = [rel_err(x, ref) for x in (prefill, decode, chunks)]
    print(f"\n{variant}: max relative logits error prefill {errs[0]:.2e}, decode {errs[1]:.2e}, chunked {errs[2]:.2e}")
    assert max(errs) < REL_TOL, errs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers(models, variant):
    path, hf = models[variant]
    m = moe_offload.load(path, device="cpu", dtype="float32")
    ours = m.generate(PROMPT, max_new_tokens=24)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False,
                          eos_token_id=list(m.config.eos_token_ids), pad_token_id=0)
    assert len(ours.token_ids) == 24 and ours.token_ids == out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_offloaded_equals_resident_below_the_expert_count(models, variant):
    """cache_per_layer K+1 < E: the engine holds the 2 MoE layers' routed experts only (the dense first
    layer and the shared experts stay with the dense weights)."""
    path, _ = models[variant]
    resident = moe_offload.load(path, device="cpu", dtype="float32")
    ref_prefill, ref_decode = resident.logits(IDS), decode_logits(resident, IDS, 3)
    ref_tokens = resident.generate(PROMPT, max_new_tokens=24).token_ids
    m = moe_offload.load(path, device="cpu", dtype="float32",
                         config=OffloadConfig.make(cache_per_layer=K + 1, predictor="next-gate"))
    assert m.expert_cache.num_slots == M * (K + 1) < M * E
    assert (m.expert_cache.store.num_layers, m.expert_cache.store.num_experts) == (M, E)
    assert torch.equal(m.logits(IDS), ref_prefill)
    assert torch.equal(decode_logits(m, IDS, 3), ref_decode)
    assert m.generate(PROMPT, max_new_tokens=24).token_ids == ref_tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_runs_close_to_transformers(models, variant):
    """bfloat16 prefill is as close to transformers' float32 as transformers' own bfloat16 run (measured
    0.014 / 0.036 / 0.011 for both); decode attends in latent space, whose roundings differ (measured
    0.013 / 0.073 / 0.009: V2's routed_scaling_factor 16 magnifies a router that rounds differently)."""
    import transformers

    path, hf32 = models[variant]
    arch = VARIANTS[variant][0]
    hf = getattr(transformers, f"{arch}ForCausalLM").from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    m = moe_offload.load(path, device="cpu", dtype="bfloat16")
    with torch.no_grad():
        ref, ref16 = hf32(torch.tensor([IDS])).logits[0], hf(torch.tensor([IDS])).logits[0].float()
    prefill, decode = m.logits(IDS).float(), decode_logits(m, IDS, 3).float()
    assert m.kv_cache.k.dtype == torch.bfloat16
    assert rel_err(prefill, ref) < max(1.1 * rel_err(ref16, ref), 2e-2), (rel_err(prefill, ref), rel_err(ref16, ref))
    assert rel_err(decode, ref) < 0.1, rel_err(decode, ref)
    assert len(m.generate(PROMPT, max_new_tokens=8).token_ids) == 8


def test_cache_holds_only_the_latent_and_rope_key(models):
    """MLA's cache: (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes per token, allocated and as
    `info` and the memory plan count it; v is a view of the latent, without storage of its own."""
    from moe_offload.info import describe
    from moe_offload.offload.plan import CacheBudget, plan_memory

    path, _ = models["v3"]
    m = moe_offload.load(path, device="cpu", dtype="bfloat16")
    kv, seq = m.kv_cache, m.kv_cache.max_seq_len
    per_token = (R + DR) * L * 2
    assert kv.k.shape == (L, 1, 1, seq, R + DR) and kv.k.untyped_storage().nbytes() == per_token * seq
    assert kv.v.untyped_storage().data_ptr() == kv.k.untyped_storage().data_ptr() and kv.v.shape[-1] == R
    assert describe(str(path))["bytes"]["kv_cache_per_token"] == (R + DR) * L * 4  # the checkpoint's float32
    plan = plan_memory(m.config, torch.device("cpu"), torch.bfloat16, seq, CacheBudget(None, K, None), False)
    assert plan.kv_cache_bytes == per_token * seq


def test_batched_greedy_equals_solo_runs(models):
    """Batched decode (RowPositions: each row at its own position) attends in latent space per row."""
    path, _ = models["v3"]
    m = moe_offload.load(path, device="cpu", dtype="float32", config=OffloadConfig.make(cache_per_layer=K + 1))
    prompts = [[1, 7, 3], [1, 9], [1, 4, 4, 8, 2, 6, 11, 12], [1]]
    solo = [m.generate(p, max_new_tokens=10).token_ids for p in prompts]
    assert [r.token_ids for r in m.generate(prompts, max_new_tokens=10, max_batch=3)] == solo


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the latent attention of the deep seek " * 20], trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40]))
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("variant", ["v3", "v2_lite"])
def test_cli_generates_from_the_folder(models, variant, tmp_path, capsys):
    from moe_offload.cli import main

    src, _ = models[variant]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    _tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the latent", "--max-new-tokens", "6",
                 "--device", "cpu", "--dtype", "float32", "--cache-per-layer", str(K), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ref = moe_offload.load(tmp_path, device="cpu", dtype="float32").generate("the latent", max_new_tokens=6)
    assert res["token_ids"] == ref.token_ids and len(res["token_ids"]) == 6


def test_kimi_k2_is_deepseek_v3(models, tmp_path):
    """Kimi-K2 ships DeepSeek-V3's architecture under model_type kimi_k2."""
    src, _ = models["v3"]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    m = moe_offload.load(tmp_path, device="cpu", dtype="float32")
    assert m.config.family.model_type == "kimi_k2"
    assert torch.equal(m.logits(IDS), moe_offload.load(src, device="cpu", dtype="float32").logits(IDS))


def test_yarn_frequencies_and_scales_match_transformers():
    """layers.yarn_inv_freq bit for bit against transformers' yarn (truncated or not), and the two
    corrections: the tables' attention factor and MLA's softmax scale."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    from moe_offload.model.layers import yarn_inv_freq
    from moe_offload.model.mla import softmax_scale
    from moe_offload.model.transformer import rope_scaling

    for truncate, (dim, factor, orig, ms, msa) in [(True, (8, 40, 64, 1.0, 1.0)), (True, (64, 40, 4096, 0.707, 0.8)),
                                                   (False, (64, 32, 4096, 0.0, 0.0)), (True, (16, 4, 128, 1.0, 0.0))]:
        scaling = dict(type="yarn", factor=factor, original_max_position_embeddings=orig, truncate=truncate,
                       **({"mscale": ms} if ms else {}), **({"mscale_all_dim": msa} if msa else {}))
        hf_cfg = transformers.DeepseekV3Config(qk_rope_head_dim=dim, max_position_embeddings=orig * 4,
                                               rope_scaling=scaling)
        inv, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
        assert torch.equal(yarn_inv_freq(dim, 1e4, factor, orig, truncate=truncate), inv)
        ours = ModelConfig.from_dict({**COMMON, "model_type": "deepseek_v3", "q_lora_rank": 8, "qk_rope_head_dim": dim,
                                      "max_position_embeddings": orig * 4, "rope_scaling": scaling})
        freq, table_factor = rope_scaling(ours)
        assert torch.equal(freq, inv) and table_factor == pytest.approx(factor_ref, rel=1e-12)
        assert softmax_scale(ours) == pytest.approx(yarn_apply_mscale(hf_cfg.rope_parameters, (12 + dim) ** -0.5),
                                                    rel=1e-12)


def test_published_v2_lite_config_parses_with_latent_kv_bytes():
    lite = dict(COMMON, model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
                kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
                routed_scaling_factor=1.0, max_position_embeddings=163840, rope_theta=10000,
                rope_scaling=dict(type="yarn", factor=40, mscale=0.707, mscale_all_dim=0.707, beta_fast=32,
                                  beta_slow=1, original_max_position_embeddings=4096))
    cfg = ModelConfig.from_dict(lite)
    assert cfg.kv_elements_per_token == 27 * (512 + 64)
    assert abs(cfg.total_params / 1e9 - 15.7) < 0.2 and abs(cfg.active_params / 1e9 - 2.66) < 0.2  # 15.7B / 2.4B
    with pytest.raises(ConfigError, match="norm_topk_prob=true is not supported for deepseek_v2"):
        ModelConfig.from_dict({**lite, "norm_topk_prob": True})
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc' is not one of"):
        ModelConfig.from_dict({**lite, "topk_method": "noaux_tc"})


def test_info_counts_every_checkpoint_tensor(models):
    from safetensors.torch import load_file

    from moe_offload.info import describe

    for variant, (path, _) in models.items():
        total = sum(t.numel() for t in load_file(path / "model.safetensors").values())
        assert describe(str(path))["params"]["total"] == total, variant


def test_m2r2_trains_on_latent_attention_and_peek_is_refused(models, tmp_path):
    """m2r2 adapters train through the MLA model and keep offloaded outputs exact; attention peek reads
    grouped-query key/value heads, which MLA has not: refused in one line."""
    from moe_offload.predict import model_fingerprint
    from moe_offload.predict.train import train_accelerator

    path, _ = models["v3"]
    m = moe_offload.load(path, device="cpu", dtype="float32", offload=False)
    ids = torch.randint(3, 64, (320,), generator=torch.Generator().manual_seed(4)).tolist()
    acc, report = train_accelerator(m.model, ids, lookaheads=[1], rank=4, epochs=1, window=32, show_progress=False)
    assert report["heldout_after"]["loss"] < report["heldout_before"]["loss"]
    f = tmp_path / "acc.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model), "model": str(path)})
    off = moe_offload.load(path, device="cpu", dtype="float32", predictor="m2r2",
                           config=OffloadConfig.make(cache_per_layer=K, accelerator=f))
    assert off.generate(PROMPT, max_new_tokens=12).token_ids == m.generate(PROMPT, max_new_tokens=12).token_ids
    with pytest.raises(ConfigError, match="multi-head latent attention has no grouped-query key/value heads") as err:
        train_accelerator(m.model, ids, lookaheads=[1], rank=4, epochs=1, window=32, show_progress=False, peek=True)
    assert "\n" not in str(err.value)


def test_int8_dense_weights_are_refused_for_latent_attention(models):
    with pytest.raises(moe_offload.MoeOffloadError, match="multi-head latent attention"):
        moe_offload.load(models["v3"][0], moe_offload.OffloadConfig(device="cpu", dtype="bfloat16", dense_dtype="int8"))
