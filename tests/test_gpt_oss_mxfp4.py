"""GPT-OSS as published: experts in MXFP4 (quantization_config quant_method "mxfp4"), loaded as shipped.

The folder: a tiny random GptOssForCausalLM saved by transformers, its experts then quantized to MXFP4 by
this file's own numpy writer (the OCP MX spec: 32 e2m1 values per block, one e8m0 scale; rows of
gate_up_proj interleaved gate, up as the hub has them), written in bfloat16 like the hub's checkpoints
(biases too) with the hub's quantization_config. The oracle: transformers' GptOssForCausalLM loading the
same folder with Mxfp4Config(dequantize=True) on the CPU (its own convert_moe_packed_tensors), and the
float64 values the writer's codes and scales stand for. Checked: the dequantized experts bit for bit,
float32 logits and greedy tokens, offloaded = resident, host store bytes = the file's expert bytes (row by
row, verbatim), `info --json`, bad input in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moe_offload
from moe_offload import MoeOffloadError
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import CheckpointError
from moe_offload.options import OffloadConfig
from helpers import decode_logits, rel_err, rounded_x

ASSETS = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"
REL_TOL = 1e-4  # float32
L, E, K, H, I = 4, 8, 2, 64, 32
HF = dict(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=K, sliding_window=4,
          layer_types=["sliding_attention", "full_attention"] * (L // 2), max_position_embeddings=2048,
          rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                            original_max_position_embeddings=64),
          rope_theta=150000.0, swiglu_limit=1.5, initializer_range=0.2, rms_norm_eps=1e-5, eos_token_id=None,
          bos_token_id=None, tie_word_embeddings=False)
QC = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                 "lm_head"], "quant_method": "mxfp4"}  # as openai/gpt-oss-20b's config.json has it
IDS = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1)).tolist()
PROMPT = IDS[:9]
EXPERTS = "model.layers.{}.mlp.experts."


# --- the writer: the OCP MX spec, numpy only ----------------------------------------------------------
E2M1_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [..., N, K] -> (blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32], the float64 values
    they stand for [..., N, K]): per block of 32 the smallest power-of-two scale that brings the largest
    magnitude within 6, each value rounded to the nearest e2m1 (code = sign << 3 | magnitude index),
    element 2j in the low nibble of byte j, 2j + 1 in the high one."""
    w = w.astype(np.float64)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(g).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-300) / 6.0)), 0).astype(np.int64)
    x = g / np.ldexp(1.0, exp)[..., None]
    mag = np.abs(np.abs(x)[..., None] - E2M1_MAG).argmin(axis=-1)
    codes = (mag | np.where(x < 0, 8, 0)).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    values = np.where(codes >= 8, -1.0, 1.0) * E2M1_MAG[codes & 7] * np.ldexp(1.0, exp)[..., None]
    return (np.ascontiguousarray(blocks, dtype=np.uint8), np.ascontiguousarray(exp + 127, dtype=np.uint8),
            values.reshape(w.shape))


def build(root: Path):
    """(folder, {tensor name: the float64 values its MXFP4 stands for, [E, N out, K in]})."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**HF, experts_implementation="eager")).eval()
    with torch.no_grad():  # norms ones and biases zero at init: perturb so mistakes show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)
    src, dst = root / "float", root / "mxfp4"
    model.save_pretrained(src, safe_serialization=True)
    out, spec = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, K in, N out] as transformers keeps it
            blocks, scales, values = mxfp4_quantize(t.transpose(1, 2).numpy())
            out[name + "_blocks"], out[name + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
            spec[name] = values
        else:
            out[name] = t.to(torch.bfloat16)  # the hub's checkpoints: bfloat16 beside the packed experts
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(quantization_config=QC, dtype="bfloat16")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst, spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpt_oss_mxfp4"))


@pytest.fixture(scope="module")
def oracle(folder):
    import transformers

    path, _ = folder
    return transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True),
        experts_implementation="eager").eval()


def _tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_folder_is_the_hub_layout_and_parses_as_mxfp4(folder):
    path, _ = folder
    t, p = _tensors(path), EXPERTS.format(0)
    assert t[p + "gate_up_proj_blocks"] == ((E, 2 * I, H // 32, 16), "U8")
    assert t[p + "gate_up_proj_scales"] == ((E, 2 * I, H // 32), "U8")
    assert t[p + "down_proj_blocks"] == ((E, H, I // 32, 16), "U8")
    assert t[p + "down_proj_scales"] == ((E, H, I // 32), "U8")
    assert t[p + "gate_up_proj_bias"] == ((E, 2 * I), "BF16") and t[p + "down_proj_bias"] == ((E, H), "BF16")
    ckpt = Checkpoint(path)
    ckpt.validate()
    cfg = ckpt.config
    assert (cfg.expert_format, cfg.shipped_format, cfg.expert_bias) == ("mxfp4", "mxfp4", True)
    assert repr(ckpt.expert_format()) == "Mxfp4Format('mxfp4', bias bfloat16)"


def test_dequant_equals_transformers_for_every_byte_and_scale():
    """Every byte (two e2m1 codes) under every e8m0 scale, 2 ** -127 (subnormal) to 2 ** 128 (inf),
    equals transformers' convert_moe_packed_tensors bit for bit."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moe_offload.formats.mxfp4 import dequant_mxfp4

    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16).expand(256, 16, 16).contiguous()  # [N, g, 16]
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).contiguous()
    theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].t()
    torch.testing.assert_close(dequant_mxfp4(blocks, scales), theirs, rtol=0, atol=0, equal_nan=True)
    assert theirs[:253].isfinite().all() and theirs[0].ne(0).any() and theirs[253:].isinf().any()  # both ends


def test_dequantized_experts_equal_transformers_and_the_spec_bit_for_bit(folder, oracle):
    """Every expert of every layer, dequantized from the host store's rows, equals transformers' dequantized
    parameters (gate_up_proj [H, 2I] interleaved, down_proj [I, H]) and the writer's float64 values; the
    biases equal theirs."""
    path, spec = folder
    m = moe_offload.load(path, device="cpu", dtype="float32")
    store = m.model.experts.store
    assert store.format.name == "mxfp4" and m.runtime.expert_format == "mxfp4"
    n = 0
    for layer in range(L):
        pool = store.layer_pool(layer)
        theirs = oracle.model.layers[layer].mlp.experts
        p = EXPERTS.format(layer)
        for e in range(E):
            w13, w2 = pool.dequant_projection("w13", e), pool.dequant_projection("w2", e)
            assert w13.dtype == w2.dtype == torch.float32
            gu = theirs.gate_up_proj[e].t()  # [2I, H]: gate row j at 2j, up row j at 2j + 1
            assert torch.equal(w13, torch.cat([gu[0::2], gu[1::2]]))
            assert torch.equal(w2, theirs.down_proj[e].t())
            want = torch.from_numpy(spec[p + "gate_up_proj"][e])
            assert torch.equal(w13.double(), torch.cat([want[0::2], want[1::2]]))
            assert torch.equal(w2.double(), torch.from_numpy(spec[p + "down_proj"][e]))
            b13, b2 = pool.biases(e, torch.float32)
            bias = theirs.gate_up_proj_bias[e]
            assert torch.equal(b13, torch.cat([bias[0::2], bias[1::2]])) and torch.equal(b2, theirs.down_proj_bias[e])
            n += 1
    assert n == L * E


def test_logits_and_greedy_tokens_match_transformers(folder, oracle):
    path, _ = folder
    m = moe_offload.load(path, device="cpu", dtype="float32")
    with torch.no_grad():
        ref = oracle(torch.tensor([IDS])).logits[0]
        out = oracle.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    errs = [rel_err(m.logits(IDS), ref), rel_err(decode_logits(m, IDS, 3), ref)]
    print(f"\ngpt_oss mxfp4: max relative logits error prefill {errs[0]:.2e}, decode {errs[1]:.2e}")
    assert max(errs) < REL_TOL, errs
    ours = m.generate(PROMPT, max_new_tokens=24).token_ids
    assert len(ours) == 24 and ours == out[0, len(PROMPT):].tolist()


def test_offloaded_equals_resident_below_the_expert_count(folder):
    """cache_per_layer K+1 < E: the packed rows (blocks, scales, biases) travel host store -> slots."""
    path, _ = folder
    resident = moe_offload.load(path, device="cpu", dtype="float32")
    ref_prefill, ref_decode = resident.logits(IDS), decode_logits(resident, IDS, 3)
    ref_tokens = resident.generate(PROMPT, max_new_tokens=24).token_ids
    m = moe_offload.load(path, device="cpu", dtype="float32",
                         config=OffloadConfig.make(cache_per_layer=K + 1, predictor="next-gate"))
    assert m.expert_cache.num_slots == L * (K + 1) < L * E
    assert torch.equal(m.logits(IDS), ref_prefill)
    assert torch.equal(decode_logits(m, IDS, 3), ref_decode)
    assert m.generate(PROMPT, max_new_tokens=24).token_ids == ref_tokens
    prompts = [[1, 7, 3], [1, 9], [1, 4, 4, 8, 2, 6, 11, 12]]
    solo = [m.generate(q, max_new_tokens=6).token_ids for q in prompts]
    assert [r.token_ids for r in m.generate(prompts, max_new_tokens=6, max_batch=3)] == solo


def test_host_store_holds_the_files_expert_bytes_verbatim(folder):
    path, _ = folder
    file = load_file(path / "model.safetensors")
    expert = {k: v for k, v in file.items() if ".experts." in k}
    file_bytes = sum(v.numel() * v.element_size() for v in expert.values())
    per_expert = (2 * I * H // 2 + 2 * I * H // 32) + (H * I // 2 + H * I // 32) + 2 * (2 * I + H)
    assert file_bytes == L * E * per_expert
    m = moe_offload.load(path, device="cpu", dtype="float32", config=OffloadConfig.make(cache_per_layer=K + 1))
    store = m.expert_cache.store
    assert store.host_bytes == file_bytes == Checkpoint(path).expert_file_bytes()
    assert store.expert_bytes == per_expert and store.mapped and store.buffer is None  # read in place on the CPU
    names = {"w13.blocks": "gate_up_proj_blocks", "w13.scales": "gate_up_proj_scales", "b13": "gate_up_proj_bias",
             "w2.blocks": "down_proj_blocks", "w2.scales": "down_proj_scales", "b2": "down_proj_bias"}
    for layer, e in [(0, 0), (1, 5), (3, 7)]:
        row = store.row(layer, e)
        secs = store.format.layout(H, I)
        assert sorted(s.name for s in secs) == sorted(names) and sum(s.nbytes for s in secs) == row.numel()
        for sec in secs:
            want = file[EXPERTS.format(layer) + names[sec.name]][e].contiguous().view(-1).view(torch.uint8)
            assert torch.equal(row[sec.offset: sec.offset + sec.nbytes], want), (layer, e, sec.name)


def test_info_json_reports_the_format(folder, capsys):
    from moe_offload.cli import main

    path, _ = folder
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    st = info["expert_store"]
    assert st["format"] == "mxfp4" and info["runnable"] is True
    assert st["host_bytes"] == st["file_expert_bytes"] == L * E * st["one_expert_bytes"]
    assert st["tensor_groups"]["mlp.experts.gate_up_proj"] == {"mxfp4": L}
    assert st["tensor_groups"]["mlp.experts.down_proj_bias"] == {"BF16": L}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = load_file(src / "model.safetensors")
    edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_input_is_refused_in_one_line(folder, tmp_path):
    path, _ = folder
    name = EXPERTS.format(2) + "down_proj_scales"
    bad = _rewrite(path, tmp_path / "scales", lambda t: t.update({name: t[name][:, :, :0].contiguous()}))
    with pytest.raises(CheckpointError) as err:
        moe_offload.load(bad, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{bad / 'model.safetensors'}: tensor {name} is [8, 64, 0] U8, expected [8, 64, 1] U8" in msg
    name = EXPERTS.format(1) + "gate_up_proj_blocks"
    bad = _rewrite(path, tmp_path / "dtype", lambda t: t.update({name: t[name].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {name} is \[8, 64, 2, 16\] I8, expected "
                                              r"\[8, 64, 2, 16\] U8") as err:
        moe_offload.load(bad, device="cpu")
    assert "\n" not in str(err.value)
    for kw, words in [(dict(expert_dtype="int4"), "holds mxfp4 experts"),
                      (dict(config=OffloadConfig.make(moe_backend="grouped_mm")), "run on the loop backend")]:
        with pytest.raises(MoeOffloadError) as err:
            moe_offload.load(path, device="cpu", dtype="float32", **kw)
        assert words in str(err.value) and "\n" not in str(err.value)


def test_bfloat16_run_dequantizes_exactly_and_generates(folder):
    """e2m1 times a power of two is exact in bfloat16: the bf16 run's experts are the float32 run's."""
    path, _ = folder
    m = moe_offload.load(path, device="cpu", dtype="bfloat16")
    pool = m.model.experts.store.layer_pool(1)
    w13, w2 = pool.dequant(3, torch.bfloat16)
    assert torch.equal(w13.float(), pool.dequant_projection("w13", 3)) and torch.equal(w2.float(),
                                                                                      pool.dequant_projection("w2", 3))
    assert len(m.generate(PROMPT, max_new_tokens=6).token_ids) == 6


def test_published_config_sizes_the_row_as_info_does():
    """The published 20B config: experts 'mxfp4' with bf16 biases; the row (blocks, scales, biases) weighs
    what info's independent formula says the shipped expert weighs."""
    from moe_offload.config import ModelConfig
    from moe_offload.formats import get_format
    from moe_offload.info import shipped_expert_bytes

    cfg = ModelConfig.from_file(ASSETS / "gpt-oss-20b.config.json")
    assert (cfg.expert_format, cfg.family.unsupported(cfg)) == ("mxfp4", None)
    fmt = get_format("mxfp4").with_bias(torch.bfloat16)
    assert fmt.expert_bytes(cfg.hidden_size, cfg.intermediate_size) == shipped_expert_bytes(cfg)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_cpu_kernel_reads_the_interleaved_rows_and_biases_as_stored(folder, monkeypatch):
    """cpu_activations int8: an expert through the compiled MXFP4 kernel equals the dequantized expert
    (transformers-exact, above) applied to the activations rounded per block of 32 (gguf.quants' Q8_0),
    gate_up interleaved in the file with its bias as stored. down_proj's K = 32 is not a multiple of 64:
    it dequantizes, on the exact activations."""
    from moe_offload.kernels import cpu_gemv

    if not cpu_gemv.has_vnni():
        pytest.skip("no AVX512-VNNI")
    path, _ = folder
    m = moe_offload.load(path, device="cpu", dtype="float32", config=OffloadConfig.make(cpu_activations="int8"))
    pool = m.model.experts.store.layer_pool(1)
    calls, real = [], cpu_gemv.mxfp4_linear
    monkeypatch.setattr(cpu_gemv, "mxfp4_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(4))
    got = pool.ffn(5, x)
    assert calls == [(2 * I, H // 32, 16)]  # w13 only
    w13, w2 = (w.double() for w in pool.dequant(5, torch.float32))  # [gate rows; up rows], [H, I]
    b13, b2 = (b.double() for b in pool.biases(5, torch.float32))
    gate, up = (rounded_x(x) @ w13.T + b13).chunk(2, dim=-1)
    want = pool.act(gate, up) @ w2.T + b2
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    cpu_gemv.set_activations("exact")  # the same call without the kernel: dequantize, exact activations
    assert calls == [(2 * I, H // 32, 16)] and rel_err(pool.ffn(5, x), got) > 1e-6
