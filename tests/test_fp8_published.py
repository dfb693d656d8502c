"""FP8 block checkpoints as DeepSeek-V3 / R1, Kimi-K2 and Qwen3-*-FP8 publish them load and run: every
linear float8_e4m3fn with a `weight_scale_inv` per block (attention, dense MLPs, shared and routed experts),
the config.json in the hub's spelling, the weights sharded with an index. The routed experts stay FP8 (host
store bytes = the file's expert bytes); the other FP8 linears are dequantized as they load.

Oracles, never our own code on both sides: transformers' model loaded from the same FP8 folder with
FineGrainedFP8Config(dequantize=True) on CPU in float32 (logits, greedy tokens, each dequantized tensor);
where a shape is not a multiple of the block (DeepSeek-V3's kv_a_proj_with_mqa [576, 7168]: 4.5 blocks),
which transformers' dequantization cannot split (it derives the block from the scale grid), transformers'
float model of what the file stands for (tests/hub_writers.py's fp8_reference, written independently
of moe_offload's reader). The FP8 folders are written by tests/hub_writers.py from the float model
transformers saved (save_pretrained): e4m3 codes with a per-block scale amax / 448."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from helpers import rel_err
from hub_writers import expert_file_bytes, fp8_reference, publish_fp8_folder
from moe_offload.checkpoint import Checkpoint
from moe_offload.cli import main
from moe_offload.config import ModelConfig
from moe_offload.errors import CheckpointError, NonFiniteError
from moe_offload.offload.store import HostExpertStore

ASSETS = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"
PROMPT = [5, 17, 3, 88, 41, 9, 60]
REL_TOL = 1e-4  # float32: the same dequantized weights, summed in another order
NEW = 12

# The published configs (moe_offload/assets, the hub's spelling: rope_scaling with "type", torch_dtype),
# shrunk; shapes multiples of the block where transformers is the oracle.
V3 = dict(vocab_size=96, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
          first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=64,
          qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=3,
          n_group=4, topk_group=2, max_position_embeddings=256)
# kv_a_proj_with_mqa [192, 256], the experts' width 192 and the dense MLP's 320: blocks cut short at the edges
V3_PARTIAL = dict(V3, kv_lora_rank=128, moe_intermediate_size=192, intermediate_size=320)
V2_LITE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
               kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8,
               n_shared_experts=2, num_experts_per_tok=3, topk_method="greedy", max_position_embeddings=256)
QWEN3 = dict(vocab_size=96, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
UNCONVERTED = "model.layers.1.self_attn.o_proj.weight"  # in Qwen3's modules_to_not_convert: stored as saved
# name -> (transformers class prefix, hub config (asset or dict), shrunk keys, block, scale dtype, oracle)
CASES = {
    "deepseek_v3": ("DeepseekV3", "deepseek-v3", V3, (128, 128), torch.float32, "fp8"),
    "deepseek_v3_partial_blocks": ("DeepseekV3", "deepseek-v3", V3_PARTIAL, (128, 128), torch.float32, "spec"),
    "deepseek_v2_lite": ("DeepseekV2", None, V2_LITE, (32, 32), torch.float32, "fp8"),
    "qwen3_moe": ("Qwen3Moe", "qwen3-30b-a3b", QWEN3, (128, 128), torch.bfloat16, "fp8"),
}


def hub_config(arch: str, asset: str | None, shrunk: dict) -> dict:
    """The published config.json (its keys and spelling) with the tiny model's sizes."""
    if asset is None:  # DeepSeek-V2-Lite's config.json keys
        cfg = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_act": "silu",
               "bos_token_id": 100000, "eos_token_id": 100001, "routed_scaling_factor": 1.0, "n_group": 1,
               "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax", "rms_norm_eps": 1e-6,
               "rope_theta": 10000, "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16"}
        return {**cfg, **shrunk, "bos_token_id": 1, "eos_token_id": 2}
    cfg = json.loads((ASSETS / f"{asset}.config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg.update(shrunk)
    if cfg.get("rope_scaling"):
        cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=64)
    if arch == "Qwen3Moe":  # Qwen3-*-FP8: the router gates and lm_head named unconverted; one more linear too
        cfg["quantization_config"] = {"modules_to_not_convert": ["lm_head", UNCONVERTED.removesuffix(".weight")] + [
            f"model.layers.{i}.mlp.gate" for i in range(cfg["num_hidden_layers"])]}
    return cfg


def build(root, name: str):
    """(FP8 folder, its tensors, the oracle transformers model, the float model transformers saved)."""
    import transformers
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    arch, asset, shrunk, block, scale_dtype, oracle = CASES[name]
    hub = hub_config(arch, asset, shrunk)
    torch.manual_seed(0)
    keys = {k: v for k, v in hub.items() if k not in ("quantization_config", "architectures")}
    cfg = getattr(transformers, f"{arch}Config")(**{**keys, "initializer_range": 0.1}, experts_implementation="eager")
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # norms ones and the correction bias zero at init: perturb so mistakes show
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.3)
            elif pname.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    src, dst, spec = root / "float", root / "fp8", root / "spec"
    model.save_pretrained(src)
    tensors = publish_fp8_folder(src, dst, hub, block, scale_dtype, spec_folder=spec if oracle == "spec" else None)
    load = dict(dtype=torch.float32, experts_implementation="eager")
    if oracle == "spec":
        hf = AutoModelForCausalLM.from_pretrained(spec, **load).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(dst, **load,
                                                  quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    return dst, tensors, hf, model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> build(name), each built once for the module."""
    out = {}

    def get(name):
        if name not in out:
            out[name] = build(tmp_path_factory.mktemp(name), name)
        return out[name]
    return get


@pytest.fixture(scope="module", params=list(CASES))
def case(request, built):
    return (request.param, *built(request.param))


@pytest.fixture(scope="module")
def v3(built):
    return built("deepseek_v3")


def _oracle_run(hf, eos):
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0]
        tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)[0, len(PROMPT):].tolist()
    return logits, tokens


def _assert_runs_like(folder, hf, block, cache_per_layer):
    """Resident and offloaded (a cache smaller than the expert count) runs of `folder` against `hf`."""
    ours = mo.load(folder, device="cpu", dtype="float32")
    assert ours.runtime.expert_format.startswith(f"fp8:{block[0]}x{block[1]}")
    want, ref = _oracle_run(hf, list(ours.config.eos_token_ids))
    got = ours.logits(PROMPT)
    assert rel_err(got, want) < REL_TOL
    assert ours.generate(PROMPT, max_new_tokens=NEW).token_ids == ref
    with mo.load(folder, device="cpu", dtype="float32", cache_per_layer=cache_per_layer) as off:
        assert torch.allclose(off.logits(PROMPT), got, atol=1e-6, rtol=0)
        r = off.generate(PROMPT, max_new_tokens=NEW)
        assert r.token_ids == ref and r.stats["misses"] > 0
    ours.close()


def test_published_fp8_runs_as_transformers_does(case):
    """Logits within 1e-4 relative and the same greedy tokens as transformers, resident and offloaded; the
    host store holds the file's routed-expert bytes, read in place."""
    name, folder, tensors, hf, _ = case
    block = CASES[name][3]
    cfg = ModelConfig.from_file(folder / "config.json")
    assert cfg.expert_format.startswith(f"fp8:{block[0]}x{block[1]}") and cfg.family.unsupported(cfg) is None
    _assert_runs_like(folder, hf, block, cache_per_layer=cfg.num_experts_per_tok + 1)
    ckpt = Checkpoint(folder)
    ckpt.validate()
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.config.expert_format)
    assert store.host_bytes == expert_file_bytes(tensors) == ckpt.expert_file_bytes()
    assert (store.format.scale_dtype, store.format.block) == (CASES[name][4], block)


def test_each_dequantized_tensor_equals_the_oracle(case):
    """Every FP8 linear outside the routed experts (attention, dense MLPs, shared experts) is dequantized at
    load to what the oracle holds, bit for bit; so is each routed expert the store dequantizes; and the
    oracle is the FP8 file's model, not the float one it was written from."""
    name, folder, tensors, hf, float_model = case
    block = CASES[name][3]
    ckpt = Checkpoint(folder)
    ckpt.validate()
    want, floats = hf.state_dict(), float_model.state_dict()
    fp8 = {n.removesuffix("_scale_inv") for n in tensors if n.endswith(".weight_scale_inv")}
    dense = sorted(n for n in fp8 if ".experts." not in n)
    assert ckpt.dequantized_linears() == dense and any("self_attn" in n for n in dense)
    for n in dense:
        got = ckpt.tensor(n, torch.float32)
        assert torch.equal(got, want[n]), n
        assert torch.equal(got, fp8_reference({"weight": tensors[n], "weight_scale_inv": tensors[n + "_scale_inv"]},
                                              block)), n
    assert not torch.equal(want[dense[0]], floats[dense[0]])  # the oracle's weights went through FP8
    if name == "qwen3_moe":  # named in modules_to_not_convert: stored as saved, read as stored
        assert ckpt.tensors[UNCONVERTED].dtype == "F32" and UNCONVERTED not in dense
        assert torch.equal(ckpt.tensor(UNCONVERTED), want[UNCONVERTED])
    cfg = ckpt.config
    pool = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=cfg.expert_format).layer_pool(1)
    layer = cfg.first_k_dense_replace + 1
    experts = hf.model.layers[layer].mlp.experts
    for e in (0, 5):
        assert torch.equal(pool.dequant_projection("w13", e), experts.gate_up_proj[e])
        assert torch.equal(pool.dequant_projection("w2", e), experts.down_proj[e])


def test_kimi_k2_loads_deepseek_v3s_layout(v3, tmp_path):
    """Kimi-K2 ships DeepSeek-V3's FP8 layout under model_type kimi_k2 (architectures DeepseekV3ForCausalLM):
    the same folder under that model_type runs as transformers' DeepSeek-V3 does."""
    folder, _, hf, _ = v3
    kimi = shutil.copytree(folder, tmp_path / "kimi")
    cfg = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    assert ModelConfig.from_file(kimi / "config.json").family.model_type == "kimi_k2"
    _assert_runs_like(kimi, hf, (128, 128), cache_per_layer=4)


def test_shipped_mtp_layer_is_ignored(v3, tmp_path):
    """The multi-token-prediction layer DeepSeek-V3 ships after its last layer (FP8 too) is not read."""
    folder, tensors, _, _ = v3
    d = shutil.copytree(folder, tmp_path / "mtp")
    last = ModelConfig.from_file(d / "config.json").num_hidden_layers
    extra = {n.replace(f"layers.{last - 1}.", f"layers.{last}."): t for n, t in tensors.items()
             if f"layers.{last - 1}." in n}
    save_file(extra, str(d / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].update({n: "model-mtp.safetensors" for n in extra})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(d)
    ckpt.validate()
    assert not any(f"layers.{last}." in n for n in ckpt.dequantized_linears())


def test_info_says_the_dense_linears_are_dequantized_at_load(v3, capsys):
    folder, tensors, _, _ = v3
    assert main(["info", "--model", str(folder)]) in (0, None)
    out = capsys.readouterr().out
    n = sum(1 for t in tensors if t.endswith("_scale_inv") and ".experts." not in t)
    assert (f"dense      {n} linears stored fp8:128x128 (attention, dense MLPs, shared experts) are dequantized to "
            "the compute dtype at load") in out
    assert "runnable   no" not in out and "stored     experts fp8:128x128" in out
    assert main(["info", "--config", str(ASSETS / "deepseek-v3.config.json")]) in (0, None)  # the published one
    out = capsys.readouterr().out
    assert "dense      linears stored fp8:128x128" in out and "runnable   no" not in out
    assert ModelConfig.from_file(ASSETS / "deepseek-v3.config.json").expert_format == "fp8:128x128"


def _broken(folder, dst, name, change):
    """A copy of the sharded `folder` with tensor `name` changed by change(t) (None: dropped)."""
    d = shutil.copytree(folder, dst)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    t = change(tensors.pop(name))
    if t is None:
        del index["weight_map"][name]
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = t
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return d


ATTN = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"


def _nan_row(t):
    return t.index_fill(0, torch.tensor([0]), float("nan"))


@pytest.mark.parametrize("name, change, error, words", [
    (ATTN, lambda t: None, CheckpointError, r"tensor {w} is float8_e4m3fn \[256, 64\] without its {s} "
                                            r"\(expected \[2, 1\] float32 or bfloat16"),
    (EXPERT, lambda t: None, CheckpointError, r"tensor {w} is float8_e4m3fn \[128, 256\] without its {s}"),
    (ATTN, lambda t: torch.cat([t, t]), CheckpointError, r"tensor {s} is \[4, 1\] F32, expected \[2, 1\] F32"),
    (EXPERT, lambda t: t[:, :1], CheckpointError, r"tensor {s} is \[1, 1\] F32, expected \[1, 2\] F32"),
    (ATTN, lambda t: t.to(torch.int32), CheckpointError, r"tensor {s} is \[2, 1\] I32, expected \[2, 1\] F32"),
    (ATTN, _nan_row, NonFiniteError, r"tensor {s} holds 1 non-finite value\(s\)"),
    (EXPERT, _nan_row, CheckpointError, r"tensor {s}: weight_scale_inv holds NaN/Inf \(fp8:128x128\)"),
], ids=["attention-missing", "expert-missing", "attention-shape", "expert-shape", "attention-int32",
        "attention-nan", "expert-nan"])
def test_bad_scales_are_refused_in_one_line_naming_file_and_tensor(v3, tmp_path, name, change, error, words):
    folder = v3[0]
    d = _broken(folder, tmp_path / "bad", name, change)
    pattern = re.escape(str(d)) + r"/model-\d+-of-\d+\.safetensors: " + words.format(w=name.removesuffix("_scale_inv").replace(".", r"\."),
                                                s=name.replace(".", r"\."))
    for cache in (None, 4):  # resident, and the offloaded store that reads the experts in place
        with pytest.raises(error, match=pattern) as exc:
            mo.load(d, device="cpu", dtype="float32", cache_per_layer=cache)
        assert "\n" not in str(exc.value)
