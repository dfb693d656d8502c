"""Family adapters: a family registered from one file (a test-local subclass here) loads a checkpoint
whose config keys and tensor names are its own, through the unchanged core; the router functions; and
the model core free of family branches and of decoding-strategy code."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload
from helpers import CFG, write_model
from moe_offload import CheckpointError, ConfigError, families
from moe_offload.checkpoint import expected_tensors, save_checkpoint
from moe_offload.config import ModelConfig
from moe_offload.families import Family, Routing
from moe_offload.model.moe import route
from moe_offload.options import OffloadConfig

ROOT = Path(__file__).resolve().parents[1]


class ToyMoe(Family):
    """A made-up family: its own config keys and tensor names, otherwise a Mixtral (renormalised
    softmax top-k, a tokenizer with bos): what a new family's file holds."""

    model_type, architecture = "toy_moe", "ToyMoeForCausalLM"
    experts_key, width_key = "n_routed_experts", "expert_width"  # its own config.json keys
    moe_prefix, router = "moe", "router"  # and tensor names
    expert_weights = {"w1": "fc_gate", "w3": "fc_up", "w2": "fc_down"}
    defaults = dict(rms_norm_eps=1e-5, rope_theta=1e4, bos_token_id=1, eos_token_id=2, norm_topk_prob=True)
    prepends_bos = True

    def fields(self, raw):
        return {**super().fields(raw), "norm_topk_prob": True}

    def routing(self, cfg):
        return Routing(top_k=cfg.num_experts_per_tok, renormalize=True)


@pytest.fixture
def toy():
    family = families.register(ToyMoe())
    try:
        yield family
    finally:
        families.unregister("toy_moe")


def toy_checkpoint(src: Path, dst: Path, family: Family) -> Path:
    """The Mixtral checkpoint at src, re-spelled in `family`'s config keys and tensor names."""
    mix = ModelConfig.from_file(src / "config.json")
    raw = json.loads((src / "config.json").read_text())
    raw.update(model_type=family.model_type, architectures=[family.architecture],
               n_routed_experts=raw.pop("num_local_experts"), expert_width=raw.pop("intermediate_size"))
    toy_cfg = ModelConfig.from_dict(raw)
    rename = {}
    for layer in range(mix.num_hidden_layers):
        new = family.layer_tensors(toy_cfg, layer)
        rename.update({name: new[slot][0] for slot, (name, _) in mix.family.layer_tensors(mix, layer).items()})
        for e in range(mix.num_local_experts):
            for w in ("w1", "w2", "w3"):
                rename[mix.family.expert_name(layer, e, w)] = family.expert_name(layer, e, w)
    tensors = {rename.get(k, k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(raw))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_a_family_registered_from_one_file_loads_its_own_checkpoint(tmp_path, toy):
    src = write_model(tmp_path / "mixtral")
    path = toy_checkpoint(src, tmp_path / "toy", toy)
    names = set(expected_tensors(ModelConfig.from_file(path / "config.json")))
    assert "model.layers.1.moe.experts.3.fc_down.weight" in names and "model.layers.0.moe.router.weight" in names
    assert not any("block_sparse_moe" in n for n in names)

    ref = moe_offload.load(src, device="cpu", dtype="float32")
    m = moe_offload.load(path, device="cpu", dtype="float32")
    assert m.config.family is toy and m.config.num_local_experts == CFG.num_local_experts
    ids = [1, 5, 9, 17, 33, 2, 8]
    assert torch.equal(m.logits(ids), ref.logits(ids))
    want = ref.generate(ids, max_new_tokens=8).token_ids
    assert m.generate(ids, max_new_tokens=8).token_ids == want
    off = moe_offload.load(path, config=OffloadConfig.make(device="cpu", dtype="float32", cache_experts=3))
    assert off.generate(ids, max_new_tokens=8).token_ids == want

    # the adapter writes its own layout back, and the checkpoint checks speak its names
    again = tmp_path / "again"
    save_checkpoint(again, m.config, m.model.checkpoint_tensors())
    assert json.loads((again / "config.json").read_text())["n_routed_experts"] == CFG.num_local_experts
    assert ModelConfig.from_file(again / "config.json") == m.config
    t = load_file(str(path / "model.safetensors"))
    del t["model.layers.1.moe.router.weight"]
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.moe\.router\.weight"):
        moe_offload.load(path, device="cpu")


def test_unregistered_family_is_refused_and_names_the_registered_ones(tmp_path, toy):
    raw = json.loads((write_model(tmp_path) / "config.json").read_text())
    families.unregister("toy_moe")
    with pytest.raises(ConfigError, match=r"model_type is 'toy_moe'; supported: \[.*'mixtral', 'olmoe'"):
        ModelConfig.from_dict(dict(raw, model_type="toy_moe"))
    families.register(ToyMoe())
    with pytest.raises(ValueError, match="registered already"):
        families.register(ToyMoe())
    with pytest.raises(ConfigError, match="missing required key"):  # its own keys: n_routed_experts, ...
        ModelConfig.from_dict(dict(raw, model_type="toy_moe"))


def test_each_builtin_family_declares_its_facts():
    got = {t: (f.architecture, f.moe_prefix, f.expert_weights["w1"], f.qk_norm, f.prepends_bos)
           for t in families.supported() for f in [families.get(t)]}
    assert got == {"deepseek_v2": ("DeepseekV2ForCausalLM", "mlp", "gate_proj", "none", False),  # latent attention
                   "deepseek_v3": ("DeepseekV3ForCausalLM", "mlp", "gate_proj", "none", False),  # latent attention
                   "glm4_moe": ("Glm4MoeForCausalLM", "mlp", "gate_proj", "none", False),  # q/k norm: use_qk_norm
                   "gpt_oss": ("GptOssForCausalLM", "mlp", "gate_proj", "none", False),  # fused experts
                   "kimi_k2": ("DeepseekV3ForCausalLM", "mlp", "gate_proj", "none", False),  # DeepSeek-V3's
                   "mixtral": ("MixtralForCausalLM", "block_sparse_moe", "w1", "none", True),
                   "olmoe": ("OlmoeForCausalLM", "mlp", "gate_proj", "full", False),
                   "qwen2_moe": ("Qwen2MoeForCausalLM", "mlp", "gate_proj", "none", False),
                   "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp", "gate_proj", "per_head", False)}


# --- router functions ------------------------------------------------------------------------------
def test_softmax_routing_is_the_reference_bit_for_bit():
    logits = torch.randn(7, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for norm in (True, False):
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, 4, dim=-1)
        w = w / w.sum(-1, keepdim=True) if norm else w
        got = Routing(top_k=4, renormalize=norm)(logits)
        assert torch.equal(got[0], w) and torch.equal(got[1], ids)
        assert all(torch.equal(a, b) for a, b in zip(route(logits, 4, norm), got))


def test_sigmoid_routing_with_correction_bias_and_groups():
    """DeepSeek-V3's rule, written out: bias moves the choice, not the weights; only the best groups
    (by the sum of their two best corrected scores) are eligible; renormalised, then scaled."""
    g = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(5, 16, generator=g), torch.randn(16, generator=g) * 0.5
    r = Routing(top_k=3, scoring="sigmoid", renormalize=True, n_group=4, topk_group=2, scale=2.5)
    w, ids = r(logits, bias)
    s = torch.sigmoid(logits)
    for row in range(5):
        corr = s[row] + bias
        groups = corr.view(4, 4).topk(2, dim=-1).values.sum(-1)
        best = set(groups.topk(2).indices.tolist())
        allowed = torch.tensor([e // 4 in best for e in range(16)])
        want = torch.where(allowed, corr, torch.tensor(float("-inf"))).topk(3).indices  # transformers' mask
        assert ids[row].tolist() == want.tolist()
        ws = s[row, want]
        torch.testing.assert_close(w[row], ws / (ws.sum() + 1e-20) * 2.5)
    w2, ids2 = Routing(top_k=3, scoring="topk_softmax")(logits)  # GPT-OSS: softmax over the top-k logits
    assert torch.equal(ids2, logits.topk(3).indices)
    torch.testing.assert_close(w2, torch.softmax(logits.topk(3).values, -1))


# --- the core asks the adapter; strategies live with the strategies -----------------------------------
CORE = ["moe_offload/config.py", "moe_offload/checkpoint.py", "moe_offload/model/transformer.py",
        "moe_offload/model/moe.py", "moe_offload/model/layers.py"]


@pytest.mark.parametrize("path", CORE)
def test_core_has_no_family_branches_and_no_strategy_code(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"model_type\s*(==|!=|\bin\b)", text), "ask cfg.family instead"
    assert not re.search(r"[\"'][^\"'\n]*(block_sparse_moe|gate_proj|shared_expert_gate|model\.(layers|embed|norm)|lm_head\.)", text), \
        "tensor names belong in families/"
    assert not re.search(r"peek|speculat|verify|pop_kept_rows", text), "decoding strategies own their hooks"


def test_position_limit_keeps_the_leading_positions_exactly(tmp_path, monkeypatch):
    """Bit-exact within one matmul: the compiled CPU decode kernels take calls of up to MAX_ROWS rows and
    PyTorch the larger ones (a 4-row and a 6-row pass would differ by float32 rounding), so they are off."""
    from moe_offload.kernels import cpu_gemv

    monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    m = moe_offload.load(write_model(tmp_path), device="cpu", dtype="float32", offload=False)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.inference_mode():
        full = m.model(ids)[0]
        seen = []
        m.model.position_limit = lambda layer: seen.append(layer) or (4 if layer == 0 else None)
        try:
            cut = m.model(ids)[0]
        finally:
            m.model.position_limit = None
    assert seen == list(range(CFG.num_hidden_layers)) and cut.shape[0] == 4
    assert torch.equal(cut, full[:4])


class ToyBiased(ToyMoe):
    """ToyMoe plus a per-layer router correction bias (DeepSeek-V3's e_score_correction_bias)."""

    model_type = "toy_biased"

    def layer_tensors(self, cfg, layer):
        out = super().layer_tensors(cfg, layer)
        out["router_bias"] = (f"model.layers.{layer}.moe.router.e_score_correction_bias", (cfg.num_local_experts,))
        return out


def test_a_family_declared_router_bias_is_loaded_and_moves_the_choice(tmp_path, toy):
    families.register(ToyBiased())
    try:
        src = write_model(tmp_path / "mixtral")
        path = toy_checkpoint(src, tmp_path / "toy", ToyBiased())
        raw = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(raw, model_type="toy_biased")))
        t = load_file(str(path / "model.safetensors"))
        for layer in range(CFG.num_hidden_layers):
            t[f"model.layers.{layer}.moe.router.e_score_correction_bias"] = torch.zeros(CFG.num_local_experts)
        save_file(t, str(path / "model.safetensors"))
        ids = [1, 5, 9, 17, 33]
        ref = moe_offload.load(src, device="cpu", dtype="float32").logits(ids)
        assert torch.equal(moe_offload.load(path, device="cpu", dtype="float32").logits(ids), ref)  # zero bias
        t["model.layers.1.moe.router.e_score_correction_bias"] = torch.tensor([100.0] + [0.0] * (CFG.num_local_experts - 1))
        save_file(t, str(path / "model.safetensors"))
        m = moe_offload.load(path, device="cpu", dtype="float32")
        logits = torch.randn(6, CFG.num_local_experts)
        assert (m.model.route(1, logits)[1] == 0).any(-1).all()  # every token now routes to expert 0 at layer 1
        assert torch.equal(m.model.route(0, logits)[1], route(logits, CFG.num_experts_per_tok)[1])
    finally:
        families.unregister("toy_biased")
