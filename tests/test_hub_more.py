"""Published checkpoints the hub formats read besides the common layouts: compressed-tensors pack-quantized
with activation ordering (weight_g_idx; oracle: compressed-tensors' own dequantization of a g_idx, see
hub_writers.ct_actorder_reference) and old AutoGPTQ checkpoints carrying all-zero `.bias` tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from hub_writers import convert_folder, ct_actorder_matrix, ct_actorder_reference
from moe_offload.errors import CheckpointError
from moe_offload.formats import get_format
from moe_offload.kernels import pool as weight_pool
from moe_offload.kernels.reference import linear

pytest.importorskip("compressed_tensors")
PROMPT = [1, 5, 9, 2, 7]


@pytest.fixture(scope="module")
def hf_float(tmp_path_factory):
    """A random MixtralForCausalLM saved by transformers."""
    from helpers import make_hf_checkpoint

    d = tmp_path_factory.mktemp("more") / "float"
    make_hf_checkpoint(d, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)
    return d


def _copy(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _tokens(ours, folder):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0]
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=list(ours.config.eos_token_ids))[0, len(PROMPT):].tolist()
    return logits, ref


# --- compressed-tensors actorder "group" ------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False), (2, False)])
def test_ct_actorder_dequant_equals_compressed_tensors(bits, sym):
    n, k, group = 40, 192, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    t = ct_actorder_matrix(w, bits, group, sym, seed=bits)
    theirs = ct_actorder_reference(t, bits, group, sym)
    fmt = get_format(f"ct:{bits},g{group},{'sym' if sym else 'asym'},act,bf16")
    assert fmt.name.endswith(",act,bf16") and get_format(fmt.name).act_order
    assert {s for s, *_ in fmt.matrix_specs(n, k)} == set(t) - {"weight_shape"}
    ours = fmt.dequant_matrix(t, n, k)
    assert torch.equal(ours.to(theirs.dtype), theirs)  # float32, rounded once to the scales' bf16
    assert not torch.equal(ours, get_format(f"ct:{bits},g{group},{'sym' if sym else 'asym'},bf16").dequant_matrix(
        t, n, k))  # the order matters
    assert fmt.check_matrix(t, n, k) is None
    bad = dict(t, weight_g_idx=t["weight_g_idx"].clone())
    bad["weight_g_idx"][3] = 6
    assert fmt.check_matrix(bad, n, k) == "weight_g_idx holds group 6, outside [0, 6) groups"


@pytest.mark.parametrize("sym", [True, False])
def test_ct_actorder_tiles_equal_the_whole_matrix(sym, monkeypatch):
    """row_slices reads weight_g_idx whole: any tile of output rows is the whole matrix's rows, bit for bit."""
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", 8)
    n, k = 72, 128
    t = ct_actorder_matrix(torch.randn(n, k, generator=torch.Generator().manual_seed(3)), 4, 32, sym, seed=5)
    t.pop("weight_shape")
    fmt = get_format(f"ct:4,g32,{'sym' if sym else 'asym'},act,bf16")
    whole = fmt.dequant_matrix(t, n, k)
    assert fmt.tile_rows(n, k) == 8
    for lo, hi in [(0, 8), (8, 16), (3, 29), (64, 72), (40, 41)]:
        assert torch.equal(fmt.dequant_matrix_rows(t, n, k, lo, hi), whole[lo:hi])
    x = torch.randn(3, k)
    want = torch.cat([linear(x, whole[lo:lo + 8]) for lo in range(0, n, 8)], dim=-1)
    assert torch.equal(fmt.matrix_linear(t, n, k, x), want)


def _ct_actorder_config(sym):
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 32,
                "actorder": "group"}, "input_activations": None}},
            "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"]}


@pytest.fixture(scope="module")
def ct_actorder_folder(hf_float, tmp_path_factory):
    """An llm-compressor (<= 0.9) actorder 'group' folder: experts and attention 4-bit asymmetric, groups of
    32, bf16 scales, weight_g_idx; and the float folder of compressed-tensors' decompression of it."""
    root = tmp_path_factory.mktemp("ct_act")
    sd = load_file(hf_float / "model.safetensors")
    out, spec = {}, dict(sd)
    for i, (name, t) in enumerate(sorted(sd.items())):
        if t.dim() == 2 and ("experts" in name or "self_attn" in name):
            packed = ct_actorder_matrix(t, 4, 32, False, seed=i)
            f32 = dict(packed, weight_scale=packed["weight_scale"].float())  # its dequantization in float32
            spec[name] = ct_actorder_reference(f32, 4, 32, False)
            out.update({f"{name.removesuffix('.weight')}.{s}": v for s, v in packed.items()})
        else:
            out[name] = t
    d, s = _copy(hf_float, root / "ct"), _copy(hf_float, root / "spec")
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_file(spec, str(s / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = _ct_actorder_config(False)
    (d / "config.json").write_text(json.dumps(cfg))
    return d, s, out


def test_ct_actorder_model_equals_transformers_on_its_decompression(ct_actorder_folder):
    """Ours on the actorder folder (experts kept as stored, g_idx in the row; attention dequantized at load)
    = transformers on compressed-tensors' decompression: same greedy tokens, logits to float32 rounding."""
    d, spec, out = ct_actorder_folder
    ours = mo.load(d, device="cpu", dtype="float32")
    assert ours.runtime.expert_format == "ct:4,g32,asym,act,bf16"
    tokens = ours.generate(PROMPT, max_new_tokens=10).token_ids
    logits, ref = _tokens(ours, spec)
    assert tokens == ref
    assert torch.allclose(ours.logits(PROMPT), logits, atol=1e-4, rtol=1e-4)
    from moe_offload.checkpoint import Checkpoint
    from moe_offload.offload.store import HostExpertStore

    ckpt = Checkpoint(d)
    ckpt.validate()
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.config.expert_format,
                                            group_size=ckpt.config.expert_group_size)
    assert store.host_bytes == ckpt.expert_file_bytes()
    fmt, row = store.format, store.row(1, 2)
    base = ckpt.config.family.expert_name(1, 2, "w2").removesuffix(".weight")
    sec = next(s for s in fmt.layout(128, 128) if s.name == "w2.weight_g_idx")
    assert torch.equal(row[sec.offset: sec.offset + sec.nbytes], out[f"{base}.weight_g_idx"].view(torch.uint8))


def test_ct_actorder_bad_g_idx_is_one_line(ct_actorder_folder, tmp_path):
    d, _, out = ct_actorder_folder
    e = "model.layers.0.block_sparse_moe.experts.1.w3"
    bad = _copy(d, tmp_path / "gidx")
    t = dict(out)
    t[f"{e}.weight_g_idx"] = t[f"{e}.weight_g_idx"].clone()
    t[f"{e}.weight_g_idx"][7] = 4
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {e}.weight_g_idx: weight_g_idx holds "
                                              r"group 4, outside \[0, 4\) groups") as exc:
        mo.load(bad, device="cpu", dtype="float32", cache_per_layer=4).generate(PROMPT, max_new_tokens=1)
    assert "\n" not in str(exc.value)


def test_ct_actorder_config_is_read(ct_actorder_folder):
    d, _, _ = ct_actorder_folder
    assert mo.load(d, device="cpu", dtype="float32").runtime.expert_format == "ct:4,g32,asym,act,bf16"


# --- old AutoGPTQ: zero biases on bias-free linears -------------------------------------------------------
def test_gptq_zero_bias_is_checked_not_stored():
    fmt = get_format("gptq:4,g32,sym")
    assert fmt.zero_specs(64, 128) == [("bias", (64,))]
    assert "bias" not in {s for s, *_ in fmt.matrix_specs(64, 128)}  # not in the row
    assert fmt.zero_problem("bias", torch.zeros(64, dtype=torch.float16)) is None
    b = torch.zeros(64, dtype=torch.float16)
    b[5] = 0.5
    msg = fmt.zero_problem("bias", b)
    assert msg.startswith("bias [5] is 0.5: a nonzero bias on a bias-free MoE expert") and "\n" not in msg
    assert get_format("ct:4,g32,sym").zero_specs(64, 128) == []


def _gptq_bias_folder(hf_float, dst, nonzero=None):
    t = convert_folder(hf_float, dst, "gptq", bits=4, group=32, sym=True, desc_act=True,
                       spec_folder=dst.parent / (dst.name + "_spec"))
    for name in [n for n in t if n.endswith(".qweight")]:
        t[name.removesuffix(".qweight") + ".bias"] = torch.zeros(t[name].shape[1], dtype=torch.float16)
    if nonzero is not None:
        t[nonzero][3] = 0.25
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return t


def test_gptq_zero_bias_folder_equals_transformers(hf_float, tmp_path):
    d = tmp_path / "gptq_bias"
    _gptq_bias_folder(hf_float, d)
    ours = mo.load(d, device="cpu", dtype="float32")
    tokens = ours.generate(PROMPT, max_new_tokens=10).token_ids
    logits, ref = _tokens(ours, tmp_path / "gptq_bias_spec")
    assert tokens == ref
    assert torch.allclose(ours.logits(PROMPT), logits, atol=1e-5, rtol=1e-5)


def test_gptq_nonzero_bias_is_one_line(hf_float, tmp_path):
    e = "model.layers.1.block_sparse_moe.experts.2.w2"
    d = tmp_path / "gptq_bad_bias"
    _gptq_bias_folder(hf_float, d, nonzero=f"{e}.bias")
    with pytest.raises(CheckpointError) as exc:
        mo.load(d, device="cpu", dtype="float32")
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"{d / 'model.safetensors'}: tensor {e}.bias: bias [3] is 0.25: a nonzero bias "
                                     "on a bias-free MoE expert")
