"""`moe-offload quantize` and quantized checkpoints (compressed-tensors pack-quantized): written then
loaded equals quantize-on-load bit for bit, offloaded equals resident, bad inputs named in one line,
nothing half-written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from helpers import as_reference, group
from moe_offload.cli import main
from moe_offload.config import ModelConfig
from moe_offload.errors import CheckpointError, ConfigError, MoeOffloadError
from moe_offload.quant.ckpt import (compress_matrix, decompress_matrix, pack_int32, parse_quantization_config,
                                    unpack_int32)
from moe_offload.quant.export import quantize_checkpoint
from moe_offload.formats.int4 import quantize_int4
from moe_offload.formats.int8 import Int8Format, quantize_int8

from helpers import write_model
from moe_offload.options import OffloadConfig

PROMPT = "In the beginning God created"


@pytest.mark.parametrize("bits,dim", [(4, 1), (4, 0), (8, 1), (8, 0)])
def test_int32_packing_round_trips(bits, dim):
    g = torch.Generator().manual_seed(bits + dim)
    u = torch.randint(0, 1 << bits, (13, 21), generator=g, dtype=torch.uint8)  # odd sizes: padded words
    words = pack_int32(u, bits, dim)
    assert words.dtype == torch.int32
    assert torch.equal(unpack_int32(words, bits, u.shape[dim], dim), u)
    if dim == 1:  # the first value sits in the lowest bits of its word
        assert int(words[0, 0]) & ((1 << bits) - 1) == int(u[0, 0])


@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("int4-asym", 64)])
def test_compressed_matrix_round_trips_our_sections(fmt, group):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    sym = fmt != "int4-asym"
    q, s, z = quantize_int8(w) + (None,) if fmt == "int8" else quantize_int4(w, group, sym)
    t = compress_matrix(q, s, z, fmt, 256)
    assert ("weight_zero_point" in t) == (not sym)  # symmetric int4 writes no zero points
    q2, s2, z2 = decompress_matrix(t, fmt, group, sym, 24, 256, "w")
    assert torch.equal(q2, q) and torch.equal(s2, s.reshape(s2.shape))
    assert (z is None and z2 is None) or torch.equal(z2, z)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    out = {}
    for fmt, g in (("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)):
        d = root / f"{fmt}-g{g}"
        assert main(["quantize", "--out", str(d), "--expert-dtype", fmt, "--group-size", str(g)]) == 0
        out[(fmt, g)] = d
    return out


@pytest.mark.parametrize("fmt,g", [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_written_then_loaded_equals_quantize_on_load_bit_for_bit(quantized, fmt, g):
    d = quantized[(fmt, g)]
    on_load = mo.load(device="cpu", expert_dtype=fmt, config=OffloadConfig.make(group_size=group(fmt, g)))
    ids = on_load.encode(PROMPT)
    want = on_load.logits(ids)
    got = mo.load(d, device="cpu")
    assert torch.equal(got.logits(ids), want)
    reference = as_reference(mo.load(device="cpu", expert_dtype=fmt, offload=False, config=OffloadConfig.make(group_size=group(fmt, g))))
    tokens = reference.generate(PROMPT, max_new_tokens=12).token_ids  # the offloaded path's exact twin
    for cap in (2, 4):
        with mo.load(d, device="cpu", cache_per_layer=cap) as off:
            r = off.generate(PROMPT, max_new_tokens=12)
            assert r.token_ids == tokens and r.stats["misses"] > 0
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["num_bits"] == (
        8 if fmt == "int8" else 4)


def test_quantized_checkpoint_refuses_another_format(quantized):
    with pytest.raises(MoeOffloadError, match="holds int4 experts"):
        mo.load(quantized[("int4", 64)], device="cpu", expert_dtype="int8")
    with pytest.raises(MoeOffloadError, match="groups of 64"):
        mo.load(quantized[("int4", 64)], device="cpu", expert_dtype="int4", config=OffloadConfig.make(group_size=128))


def _rewrite(d, name, fn):
    """Apply fn(tensors) to the shard holding tensor `name` (fn may delete it); keep the index consistent."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_bad_quantized_checkpoints_are_named(quantized, tmp_path):
    base = "model.layers.1.block_sparse_moe.experts.3.w2"
    d = tmp_path / "shape"
    shutil.copytree(quantized[("int4", 128)], d)
    _rewrite(d, base + ".weight_packed", lambda t: t.update({base + ".weight_packed": t[base + ".weight_packed"][:, :-1].clone()}))
    with pytest.raises(CheckpointError, match=f"{base}.weight_packed has shape"):
        mo.load(d, device="cpu")
    d = tmp_path / "scales"
    shutil.copytree(quantized[("int4", 128)], d)
    _rewrite(d, base + ".weight_scale", lambda t: t.pop(base + ".weight_scale"))
    with pytest.raises(CheckpointError, match=f"missing tensor {base}.weight_scale"):
        mo.load(d, device="cpu")
    d = tmp_path / "bits"
    shutil.copytree(quantized[("int8", 128)], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_bits is 3"):
        mo.load(d, device="cpu")


def test_parse_refuses_what_it_cannot_read():
    with pytest.raises(ConfigError, match="quant_method"):
        parse_quantization_config({"quant_method": "bitsandbytes"}, "c.json")  # gptq / awq / fp8: test_hub_formats
    with pytest.raises(ConfigError, match="format"):
        parse_quantization_config({"quant_method": "compressed-tensors", "format": "marlin-24",
                                   "config_groups": {"g": {"weights": {"num_bits": 4}}}}, "c.json")


def test_quantize_bad_inputs_and_nothing_half_written(tmp_path, monkeypatch, capsys):
    odd = write_model(tmp_path / "odd", ModelConfig(vocab_size=50, hidden_size=96, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, num_local_experts=4,
                                                      num_experts_per_tok=2, head_dim=48,
                                                      max_position_embeddings=32, torch_dtype="float32"))
    with pytest.raises(MoeOffloadError, match="--group-size 64 does not divide hidden_size 96"):
        quantize_checkpoint(odd, tmp_path / "o1", "int4", 64)
    with pytest.raises(MoeOffloadError, match="'int3' cannot be written"):
        quantize_checkpoint(odd, tmp_path / "o2", "int3")
    with pytest.raises(SystemExit):  # argparse: --expert-dtype choices
        main(["quantize", "--out", str(tmp_path / "x"), "--expert-dtype", "int3"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert main(["quantize", "--out", str(full), "--expert-dtype", "int8"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    calls = [0]
    real = Int8Format.pack

    def dies(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(Int8Format, "pack", dies)
    with pytest.raises(RuntimeError):
        quantize_checkpoint(odd, tmp_path / "o3", "int8")
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".o3*"))


def test_generate_names_the_expert_format_and_the_fast_cpu_dtype(capsys):
    """On the CPU, quantized experts are fast only at bfloat16 (PyTorch's weight-only ops): generate says
    so at float32, and not at bfloat16."""
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--expert-dtype", "int8"]) == 0
    err = capsys.readouterr().err
    assert "experts int8" in err and "run fast on the CPU only at --dtype bfloat16" in err
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--expert-dtype", "int8",
                 "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "experts int8" in err and "run fast on the CPU only" not in err
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert "experts unquantized" in capsys.readouterr().err


def test_int4_asym_folder_holds_the_quantize_on_load_rows(tmp_path):
    """The asymmetric variant (an option; transformers cannot load it) written then read: the host store's
    rows equal quantizing the source on load, bit for bit."""
    from moe_offload.checkpoint import Checkpoint
    from moe_offload.offload.store import HostExpertStore

    src = write_model(tmp_path / "src", ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=32,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, num_local_experts=4,
                                                      num_experts_per_tok=2, head_dim=32,
                                                      max_position_embeddings=32, torch_dtype="float32"))
    quantize_checkpoint(src, tmp_path / "asym", "int4-asym", 32)
    qc = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    ckpt = Checkpoint(tmp_path / "asym")
    assert (ckpt.config.expert_format, ckpt.config.expert_group_size) == ("int4-asym", 32)
    got = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt="int4-asym", group_size=32)
    want = HostExpertStore.from_checkpoint(Checkpoint(src), torch.float32, fmt="int4-asym", group_size=32)
    assert torch.equal(got.buffer, want.buffer)
    with pytest.raises(MoeOffloadError, match="holds int4-asym experts"):
        mo.load(tmp_path / "asym", device="cpu", expert_dtype="int4")


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random MixtralForCausalLM saved by transformers (hidden and width divisible by every group size)."""
    from helpers import make_hf_checkpoint

    d = tmp_path_factory.mktemp("hf") / "tiny"
    make_hf_checkpoint(d, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)
    return d


@pytest.mark.parametrize("fmt,g", [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantized_folder_loads_in_transformers_with_our_greedy_tokens(hf_tiny, tmp_path, fmt, g):
    """transformers (with compressed-tensors, as pip installs them) loads `moe-offload quantize`'s int8 and
    symmetric int4 folders, every group size, and its greedy tokens equal ours on that folder."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    quantize_checkpoint(hf_tiny, out, fmt, g)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    experts16 = {n: p.data.clone() for n, p in hf.named_parameters()}
    with torch.no_grad():  # experts decompress in the scales' dtype (fp16); the rest is float32
        for p in hf.parameters():
            p.data = p.data.float()
    assert all(t.dtype == torch.float16 for n, t in experts16.items() if ".experts." in n)
    ours = mo.load(out, device="cpu", dtype="float32")
    prompt = [5, 17, 3, 88, 41, 9, 60]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        # eos_token_ids: ours stop where transformers does
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=list(ours.config.eos_token_ids))[0, len(prompt):].tolist()
    # transformers' decompressed experts are q * s rounded to fp16: ours rounded the same way, bit for bit
    from moe_offload.checkpoint import Checkpoint
    from moe_offload.offload.store import HostExpertStore

    ckpt = Checkpoint(out)
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.config.expert_format,
                                            group_size=ckpt.config.expert_group_size)
    pool = store.format.pool_views(store.buffer, store.hidden, store.inter)
    for layer in range(ckpt.config.num_hidden_layers):
        experts = hf.model.layers[layer].mlp.experts
        for e in range(ckpt.config.num_local_experts):
            w13, w2 = pool.dequant(layer * ckpt.config.num_local_experts + e, torch.float32)
            assert torch.equal(w13.half().float(), experts.gate_up_proj[e].float())
            assert torch.equal(w2.half().float(), experts.down_proj[e].float())
    # ours keeps q * s in float32, so the logits differ by the fp16 rounding only
    assert torch.allclose(ours.logits(prompt), want, atol=2e-2, rtol=1e-2)
    assert ours.generate(prompt, max_new_tokens=12).token_ids == ref


def test_asymmetric_int4_folder_is_refused_by_transformers(hf_tiny, tmp_path):
    """Why int4 is symmetric by default: transformers 5.25 decompresses int4 MoE experts without zero points."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    quantize_checkpoint(hf_tiny, tmp_path / "asym", "int4-asym", 64)
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path / "asym", dtype=torch.float32)
