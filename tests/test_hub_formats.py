"""Published quantized safetensors checkpoints read as shipped (formats/hub.py): GPTQ, AWQ, FP8 block,
MXFP4, compressed-tensors pack-quantized variants.

Oracles, never our own code on both sides: transformers (FP8 dequantize=True model; MXFP4's
convert_moe_packed_tensors), compressed-tensors' own compress/decompress, gguf.quants (MXFP4 blocks),
gptqmodel (GPTQ / AWQ, only where installed: it is not installable into this environment's torch);
and everywhere the formats' published specifications, packed with numpy in tests/hub_writers.py,
independently of the readers: the codes, zeros and scales the writer packed give the expected weights."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from hub_writers import (awq_matrix, awq_reference, convert_folder, expert_file_bytes, fp8_matrix, gptq_matrix,
                         gptq_reference, mxfp4_matrix)
from moe_offload.checkpoint import Checkpoint
from moe_offload.cli import main
from moe_offload.errors import CheckpointError, ConfigError, MoeOffloadError
from moe_offload.formats import choose_format, get_format
from moe_offload.offload.store import HostExpertStore
from moe_offload.options import OffloadConfig

PROMPT = [5, 17, 3, 88, 41, 9, 60]


@pytest.fixture(scope="module")
def hf_float(tmp_path_factory):
    """A random MixtralForCausalLM saved by transformers (the float model every folder is made from)."""
    from helpers import make_hf_checkpoint

    d = tmp_path_factory.mktemp("hub") / "float"
    make_hf_checkpoint(d, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)
    return d


def _store(path):
    ckpt = Checkpoint(path)
    ckpt.validate()
    cfg = ckpt.config
    return ckpt, HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=cfg.expert_format,
                                                 group_size=cfg.expert_group_size)


def _assert_store_is_the_files_bytes(path, tensors):
    """Host store bytes = the file's expert bytes, and each row holds those bytes verbatim."""
    ckpt, store = _store(path)
    fmt, cfg = store.format, ckpt.config
    assert store.host_bytes == expert_file_bytes(tensors) == ckpt.expert_file_bytes()
    names = {w: cfg.family.expert_name(1, 3, w).removesuffix(".weight") for w in ("w1", "w3", "w2")}
    row = store.row(1, 3)
    for sec in fmt.layout(cfg.hidden_size, cfg.intermediate_size):
        w, sfx = sec.name.split(".", 1)
        want = tensors[f"{names[w]}.{sfx}"].contiguous().view(-1).view(torch.uint8)
        assert torch.equal(row[sec.offset: sec.offset + sec.nbytes], want)
    return ckpt, store


# --- FP8 block (DeepSeek-V3 / Qwen3-FP8) --------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])
def test_fp8_block_dequant_equals_transformers(shape, scale_dtype):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t = fp8_matrix(w, (128, 128), scale_dtype)
    fmt = get_format("fp8:128x128").with_scale_dtype(scale_dtype)
    ours = fmt.dequant_matrix(t, *shape)
    theirs = _dequantize_fp8_weight(t["weight"], t["weight_scale_inv"], [128, 128], torch.float32)
    assert torch.equal(ours, theirs)
    assert ((ours - w).abs() <= w.abs() / 16 + 1e-2).all()  # e4m3 keeps 3 mantissa bits


def test_fp8_model_equals_transformers_dequantized(hf_float, tmp_path):
    """transformers loads the FP8 folder (dequantize=True, CPU); ours reads it as stored: same logits,
    same greedy tokens, dense layers (attention) dequantized too, host store = the file's expert bytes."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    d = tmp_path / "fp8"
    tensors = convert_folder(hf_float, d, "fp8")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, experts_implementation="eager",
                                              quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    ours = mo.load(d, device="cpu", dtype="float32")
    assert ours.runtime.expert_format == "fp8:128x128" and ours.runtime.moe_backend == "loop"
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=list(ours.config.eos_token_ids))[0, len(PROMPT):].tolist()
    assert torch.allclose(ours.logits(PROMPT), want, atol=1e-5, rtol=1e-5)  # float32 summation order only
    assert ours.generate(PROMPT, max_new_tokens=12).token_ids == ref
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=2) as off:  # the offloaded path too
        r = off.generate(PROMPT, max_new_tokens=12)
        assert r.token_ids == ref and r.stats["misses"] > 0
    _assert_store_is_the_files_bytes(d, tensors)


# --- GPTQ -----------------------------------------------------------------------------------------------
GPTQ_CASES = [(4, 128, True, False), (4, 32, True, True), (4, 64, False, True), (4, -1, False, False),
              (8, 32, True, True), (8, -1, False, False)]


def _gptq_name(bits, group, sym, act):
    return f"gptq:{bits},{'gch' if group == -1 else f'g{group}'},{'sym' if sym else 'asym'}{',act' if act else ''}"


@pytest.mark.parametrize("bits,group,sym,act", GPTQ_CASES)
def test_gptq_dequant_equals_the_spec(bits, group, sym, act):
    """Spec oracle: the codes, zeros, scales and g_idx the numpy writer packed (AutoGPTQ's layout)."""
    w = torch.randn(72, 256, generator=torch.Generator().manual_seed(bits + group))
    t, q, z, s, g = gptq_matrix(w, bits, group, sym, act, seed=3)
    ours = get_format(_gptq_name(bits, group, sym, act)).dequant_matrix(t, 72, 256)
    assert torch.equal(ours, gptq_reference(q, z, s, g))


def test_gptq_dequant_equals_gptqmodel():
    """gptqmodel's own TorchLinear dequantization (where gptqmodel is installed)."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    for bits, group, sym, act in GPTQ_CASES:
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
        t, *_ = gptq_matrix(w, bits, group, sym, act, seed=2)
        lin = TorchLinear(bits=bits, group_size=group, sym=sym, desc_act=act, in_features=256, out_features=64,
                          bias=False, pack_dtype=torch.int32, backend=None)
        for k, v in t.items():
            getattr(lin, k).copy_(v)
        lin.qzeros += torch.tensor(sum(1 << (bits * i) for i in range(32 // bits)), dtype=torch.int64).to(torch.int32)
        theirs = lin.dequantize_weight().t().float()  # v2 zeros, as gptqmodel converts v1 checkpoints
        ours = get_format(_gptq_name(bits, group, sym, act)).dequant_matrix(t, 64, 256)
        assert torch.equal(ours.half().float(), theirs)


@pytest.fixture(scope="module")
def gptq_folder(hf_float, tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq") / "act"
    return d, convert_folder(hf_float, d, "gptq", bits=4, group=32, sym=True, desc_act=True,
                             spec_folder=d.parent / "spec")


def _transformers_tokens(folder, ours):
    """transformers' MixtralForCausalLM on a float folder: logits and greedy tokens of PROMPT."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0]
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=list(ours.config.eos_token_ids))[0, len(PROMPT):].tolist()
    return logits, ref


def test_gptq_model_loads_as_shipped(gptq_folder):
    """Ours on the GPTQ folder (experts and attention GPTQ, act-order) = transformers on the float model the
    spec says the file holds (the numpy writer's codes * scales): same greedy tokens, logits to float32
    rounding. (gptqmodel 7.7, where installed, gives these tokens too: see the report of issue 26.)"""
    d, tensors = gptq_folder
    ours = mo.load(d, device="cpu", dtype="float32")
    assert ours.runtime.expert_format == "gptq:4,g32,sym,act" and ours.runtime.moe_backend == "loop"
    tokens = ours.generate(PROMPT, max_new_tokens=12).token_ids
    logits, ref = _transformers_tokens(d.parent / "spec", ours)
    assert tokens == ref
    assert torch.allclose(ours.logits(PROMPT), logits, atol=1e-5, rtol=1e-5)
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=2) as off:
        r = off.generate(PROMPT, max_new_tokens=12)
        assert r.token_ids == tokens and r.stats["misses"] > 0
    ckpt, store = _assert_store_is_the_files_bytes(d, tensors)
    # the dense layers (attention) were stored GPTQ too: dequantized at load, equal to the spec
    q_proj = "model.layers.0.self_attn.q_proj"
    assert q_proj + ".weight" not in ckpt.tensors
    t = {k.removeprefix(q_proj + "."): v for k, v in tensors.items() if k.startswith(q_proj + ".")}
    assert torch.equal(ckpt.tensor(q_proj + ".weight"), get_format("gptq:4,g32,sym,act").dequant_matrix(t, 128, 128))


def _rewrite(d, fn):
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_gptq_bad_input_is_one_line_naming_file_and_tensor(gptq_folder, tmp_path):
    d, _ = gptq_folder
    e = "model.layers.0.block_sparse_moe.experts.0.w1"
    bad = _copy(d, tmp_path / "bits3")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {e}.qweight: GPTQ bits 3: this runtime "
                                              "reads GPTQ with bits 4 or 8") as exc:
        mo.load(bad, device="cpu")
    assert "\n" not in str(exc.value)
    bad = _copy(d, tmp_path / "scale")
    _rewrite(bad, lambda t: t.update({f"{e}.scales": t[f"{e}.scales"][:2]}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {e}.scales has shape \[2, 128\], expected "
                                              r"\[4, 128\]"):
        mo.load(bad, device="cpu")
    bad = _copy(d, tmp_path / "qzeros")
    _rewrite(bad, lambda t: t.pop(f"{e}.qzeros"))
    with pytest.raises(CheckpointError, match=rf"missing tensor {e}.qzeros"):
        mo.load(bad, device="cpu")
    bad = _copy(d, tmp_path / "gidx")
    _rewrite(bad, lambda t: t[f"{e}.g_idx"].__setitem__(5, 9))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {e}.g_idx: g_idx holds group 9, outside"):
        mo.load(bad, device="cpu")


def test_hub_formats_refuse_triton_in_one_line():
    for name in ("gptq:4,g128,sym", "awq:4,g128", "fp8:128x128", "ct:4,g64,asym"):
        with pytest.raises(MoeOffloadError, match=r"run on moe_backend 'loop' only for now") as exc:
            choose_format(name, 128, torch.float32, "triton")
        assert "\n" not in str(exc.value)
        assert choose_format(name, 128, torch.float32, "loop").name == name


def test_info_json_reports_the_format_per_tensor_group(gptq_folder, capsys):
    d, tensors = gptq_folder
    assert main(["info", "--model", str(d), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["expert_store"]
    assert st["format"] == "gptq:4,g32,sym,act"
    assert st["host_bytes"] == st["file_expert_bytes"] == expert_file_bytes(tensors)
    g = st["tensor_groups"]
    assert g["block_sparse_moe.experts.w1"] == {"gptq:4,g32,sym,act": 8}
    assert g["self_attn.q_proj"] == {"gptq:4,g32,sym,act": 2}
    assert g["block_sparse_moe.gate"] == {"F32": 2}


# --- AWQ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_dequant_equals_the_spec(group):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(group))
    t, q, z, s = awq_matrix(w, group)
    assert torch.equal(get_format(f"awq:4,g{group}").dequant_matrix(t, 40, 256), awq_reference(q, z, s, group))


def test_awq_dequant_equals_gptqmodel():
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch_awq import dequantize_gemm

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    t, *_ = awq_matrix(w, 64)
    theirs = dequantize_gemm(qweight=t["qweight"], qzeros=t["qzeros"], scales=t["scales"], bits=4, group_size=64)
    assert torch.equal(get_format("awq:4,g64").dequant_matrix(t, 64, 256).half(), theirs.t())


def test_awq_model_loads_as_shipped(hf_float, tmp_path):
    d = tmp_path / "awq"
    tensors = convert_folder(hf_float, d, "awq", group=32, spec_folder=tmp_path / "spec")
    ours = mo.load(d, device="cpu", dtype="float32")
    assert ours.runtime.expert_format == "awq:4,g32"
    logits, ref = _transformers_tokens(tmp_path / "spec", ours)
    assert ours.generate(PROMPT, max_new_tokens=12).token_ids == ref
    assert torch.allclose(ours.logits(PROMPT), logits, atol=1e-5, rtol=1e-5)
    _assert_store_is_the_files_bytes(d, tensors)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"quantization_config.version is 'gemv'; supported: 'gemm'"):
        mo.load(d, device="cpu")


# --- MXFP4 (GPT-OSS hub layout; the format level: whole GPT-OSS folders in tests/test_gpt_oss_mxfp4.py) ----
def test_mxfp4_dequant_equals_transformers_and_the_spec():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    t, ref = mxfp4_matrix(48, 128, seed=1)
    ours = get_format("mxfp4").dequant_matrix(t, 48, 128)
    assert torch.equal(ours.double(), torch.from_numpy(ref))  # the OCP MX spec, computed in float64
    theirs = convert_moe_packed_tensors(t["blocks"][None], t["scales"][None], dtype=torch.float32)[0]  # [K, N]
    assert torch.equal(ours, theirs.t())


def test_mxfp4_expert_row_is_the_hub_slice_and_deinterleaves_gate_up():
    fmt = get_format("mxfp4")
    H, I = 64, 32
    gu, gu_ref = mxfp4_matrix(2 * I, H, seed=2)
    dn, dn_ref = mxfp4_matrix(H, I, seed=3)
    row = torch.empty(fmt.expert_bytes(H, I), dtype=torch.uint8)
    fmt.write(row, {"w13.blocks": gu["blocks"], "w13.scales": gu["scales"], "w2.blocks": dn["blocks"],
                    "w2.scales": dn["scales"]}, H, I)
    assert fmt.expert_bytes(H, I) == sum(v.numel() for v in (*gu.values(), *dn.values()))
    pool = fmt.pool_views(row[None], H, I)
    w13, w2 = pool.dequant(0, torch.float64)
    want = torch.from_numpy(gu_ref)
    assert torch.equal(w13, torch.cat([want[0::2], want[1::2]]))  # GPT-OSS interleaves gate and up rows
    assert torch.equal(w2, torch.from_numpy(dn_ref))


def test_mxfp4_gguf_block_type_equals_gguf_quants():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from moe_offload.formats.gguf import BLOCK_TYPES

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 64)) * np.exp(rng.uniform(-20, 20, (8, 1)))).astype(np.float32)
    raw = np.frombuffer(quantize(x, GGMLQuantizationType.MXFP4).tobytes(), dtype=np.uint8).copy()
    raw[0], raw[17] = 0, 1  # e8m0 0 and 1: ggml's subnormal branch
    raw = raw.reshape(8, -1)
    want = dequantize(raw, GGMLQuantizationType.MXFP4)
    got = BLOCK_TYPES["MXFP4"].dequantize(torch.from_numpy(raw), 64).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# --- compressed-tensors pack-quantized variants -----------------------------------------------------
CT_CASES = [(4, "group", 32, True), (4, "group", 96, False), (4, "channel", None, False), (8, "channel", None, False),
            (8, "group", 64, True), (8, "group", 64, False), (2, "group", 64, False)]


def _ct_compress(w, bits, strategy, group, sym, scale_dtype=torch.bfloat16):
    """compressed-tensors' own quantization and packing of w [N, K] (the file an llm-compressor run writes)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=group)
    n, k = w.shape
    wg = w.reshape(n, -1, group) if strategy == "group" else w.reshape(n, 1, k)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    sd = {"weight": w.to(scale_dtype), "weight_scale": scale.to(scale_dtype), "weight_zero_point": zp}
    out = PackedQuantizationCompressor.compress(sd, scheme)
    return out, scheme


@pytest.mark.parametrize("bits,strategy,group,sym", CT_CASES)
def test_compressed_tensors_variants_equal_its_decompressor(bits, strategy, group, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    n, k = 40, 192
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    packed, scheme = _ct_compress(w, bits, strategy, group, sym)
    theirs = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    fmt = get_format(f"ct:{bits},{'ch' if group is None else f'g{group}'},{'sym' if sym else 'asym'},bf16")
    assert [s for s, *_ in fmt.matrix_specs(n, k)] == [s for s in ("weight_packed", "weight_scale",
                                                                      "weight_zero_point") if s in packed]
    ours = fmt.dequant_matrix(packed, n, k)
    assert torch.equal(ours.to(theirs.dtype), theirs)  # ours in float32, rounded once to the scales' bf16


def test_compressed_tensors_bf16_folder_reads_as_stored(hf_float, tmp_path):
    """An llm-compressor-style folder (asymmetric int4, groups of 64, bf16 scales, int64 weight_shape,
    attention quantized too) loads with the experts as stored; equal to compressed-tensors' decompression."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    sd = load_file(hf_float / "model.safetensors")
    out, want = {}, {}
    for name, t in sd.items():
        if t.dim() == 2 and ("experts" in name or "self_attn" in name):
            packed, scheme = _ct_compress(t, 4, "group", 64, False)
            base = name.removesuffix(".weight")
            out.update({f"{base}.{k}": v for k, v in packed.items()})
            want[name] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
        else:
            out[name] = t
    d = tmp_path / "ct"
    _copy(hf_float, d)
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                      "group_size": 64, "actorder": None}, "input_activations": None}},
                                  "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"]}
    (d / "config.json").write_text(json.dumps(cfg))
    ckpt, store = _store(d)
    assert ckpt.config.expert_format == "ct:4,g64,asym,bf16"
    assert store.host_bytes == ckpt.expert_file_bytes()  # weight_shape (metadata) is the only tensor not kept
    pool = store.layer_pool(1)
    e = ckpt.config.family.expert_name(1, 2, "w2")
    assert torch.equal(pool.dequant_projection("w2", 2).to(torch.bfloat16), want[e])
    q = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(ckpt.tensor(q).to(torch.bfloat16), want[q])
    assert len(mo.load(d, device="cpu", dtype="float32").generate(PROMPT, max_new_tokens=4).token_ids) == 4


def test_unsupported_configs_are_named():
    from moe_offload.quant.ckpt import parse_quantization_config

    with pytest.raises(ConfigError, match=r"quantization_config.activation_scheme is 'static'"):
        parse_quantization_config({"quant_method": "fp8", "activation_scheme": "static",
                                   "weight_block_size": [128, 128]}, "config.json")
    with pytest.raises(ConfigError, match=r"quantization_config.weight_block_size is None"):
        parse_quantization_config({"quant_method": "fp8"}, "config.json")
    with pytest.raises(ConfigError, match=r"quantization_config.checkpoint_format is 'marlin'"):
        parse_quantization_config({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "config.json")
    with pytest.raises(ConfigError, match=r"quantization_config.quant_method is 'bitsandbytes'"):
        parse_quantization_config({"quant_method": "bitsandbytes"}, "config.json")
    assert parse_quantization_config({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False,
                                      "sym": False}, "c")[0] == "gptq:8,gch,asym"
