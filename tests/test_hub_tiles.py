"""Published quantized experts (GPTQ, AWQ, FP8 block, compressed-tensors pack-quantized, MXFP4) run a tile of
output rows at a time (formats/hub.py: HubFormat.row_slices, dequant_rows, tiled_linear): never a whole
dequantized projection per call.

Oracles: the untiled path on the same rows (dequant_projection, sliced: bit for bit, act-order GPTQ and the
fused, interleaved MXFP4 gate_up included, tile boundaries inside the projection and a last partial tile);
and per format a tiny model with a tile smaller than its projections against the model-level oracles of
tests/test_hub_formats.py and tests/test_gpt_oss_mxfp4.py (transformers on the float model the file stands
for; transformers' FP8 dequantize=True load; compressed-tensors' decompressor; Mxfp4Config(dequantize=True)).
Every dequant_matrix call made while running is recorded: none covers more rows than one tile."""

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from hub_writers import convert_folder
from moe_offload.formats import get_format
from moe_offload.kernels import pool as weight_pool
from moe_offload.kernels.reference import ClampedSwiGLU, expert_ffn
from moe_offload.options import OffloadConfig

H, I = 96, 36  # I: not a multiple of 8 (GPTQ / AWQ words) nor of 16 (FP8 block rows): a last partial word / block
MX_H, MX_I = 96, 32  # MXFP4 needs input dimensions divisible by 32
NAMES = ["gptq:4,g32,sym", "gptq:4,g32,asym,act", "gptq:8,g32,asym,act,bf16", "gptq:4,gch,asym,v2", "awq:4,g32",
         "fp8:16x32", "fp8:16x32,bf16", "fp8:128x128", "ct:4,g32,asym", "ct:2,g32,asym,bf16", "ct:8,ch,asym",
         "ct:4,g32,sym", "mxfp4", "mxfp4+bias"]
PROMPT = [5, 17, 3, 88, 41, 9, 60]


def _format(name):
    if name == "mxfp4+bias":
        return get_format("mxfp4").with_bias(torch.bfloat16, ClampedSwiGLU(limit=1.5)), MX_H, MX_I
    return get_format(name), *((MX_H, MX_I) if name == "mxfp4" else (H, I))


def _fill(fmt, views, hidden, inter, gen):
    """Random valid values in every section of the rows (the bytes are random already): finite scales and
    biases, FP8 without NaN codes, MXFP4 scales without inf, GPTQ g_idx a permutation's groups (act order)
    or k // group."""
    for name, v in views.items():
        w, _, sfx = name.rpartition(".")
        k = inter if w == "w2" else hidden
        if v.dtype.is_floating_point and v.dtype != torch.float8_e4m3fn:
            v.copy_(torch.rand(v.shape, generator=gen) * 2 - 0.5)
        elif v.dtype == torch.float8_e4m3fn:
            b = v.view(torch.uint8)
            b[(b & 0x7F) == 0x7F] = 0
        elif sfx == "scales" and v.dtype == torch.uint8:  # e8m0
            v.copy_(torch.randint(110, 140, v.shape, generator=gen))
        elif sfx == "g_idx":
            g = torch.arange(k) // (k if fmt.group == -1 else fmt.group)
            for s in range(v.shape[0]):
                v[s] = g[torch.randperm(k, generator=gen)] if fmt.act_order else g


def _pool(name, slots=2):
    fmt, hidden, inter = _format(name)
    gen = torch.Generator().manual_seed(len(name))
    rows = torch.randint(0, 256, (slots, fmt.expert_bytes(hidden, inter)), dtype=torch.uint8, generator=gen)
    _fill(fmt, fmt.views(rows, hidden, inter), hidden, inter, gen)
    return fmt, fmt.pool_views(rows, hidden, inter)


@contextmanager
def recording(fmt):
    """Yields the (n, k) of every dequant_matrix call made on format `fmt`'s class while inside."""
    cls, calls = type(fmt), []
    real = cls.dequant_matrix

    def wrapper(self, t, n, k):
        calls.append((n, k))
        return real(self, t, n, k)

    cls.dequant_matrix = wrapper
    try:
        yield calls
    finally:
        cls.dequant_matrix = real


@pytest.mark.parametrize("tile", [16, 24])
@pytest.mark.parametrize("name", NAMES)
def test_rows_equal_the_projection_sliced_bit_for_bit(name, tile, monkeypatch):
    """dequant_rows over every tile of each projection (a last partial one included), ranges off the row
    multiple and across the gate / up boundary = dequant_projection's rows, bit for bit, in float32 and cast
    to bfloat16; a range is widened only to the format's row multiple (rows dequantized, recorded)."""
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", tile)
    fmt, pool = _pool(name)
    for slot in range(pool.num_slots):
        for which in ("w13", "w2"):
            full = pool.dequant_projection(which, slot)  # [N, K] float32, untiled
            n = full.shape[0]
            step = fmt.tile_rows(n, full.shape[1])
            assert step <= max(tile, fmt.row_multiple(n, full.shape[1]))
            ranges = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
            ranges += [(3, 29), (pool.inter - 5, pool.inter + 7), (n - 1, n), (0, n)]
            m = fmt.row_multiple(n, full.shape[1])
            for lo, hi in ranges:
                with recording(fmt) as calls:
                    got = pool.dequant_rows(which, slot, lo, hi)
                assert got.dtype == torch.float32 and torch.equal(got, full[lo:hi]), (which, lo, hi)
                assert sum(c[0] for c in calls) <= hi - lo + 4 * (m - 1)  # widened to the row multiple only
                assert torch.equal(pool.dequant_rows(which, slot, lo, hi, torch.bfloat16), full[lo:hi].bfloat16())
            assert torch.equal(torch.cat([pool.dequant_rows(which, slot, lo, hi) for lo, hi in ranges[:-4]]), full)


def _untiled_ffn(pool, slot, x):
    """The untiled path: both projections dequantized whole, then expert_ffn (biases, activation)."""
    return expert_ffn(x, *pool.dequant(slot, x.dtype), *pool.biases(slot, x.dtype), pool.act)


@pytest.mark.parametrize("name", NAMES)
def test_ffn_dequantizes_one_tile_at_a_time_and_equals_the_untiled_path(name, monkeypatch):
    """pool.ffn with a tile smaller than every projection: each dequant_matrix call covers at most one tile
    (rounded to the format's row multiple), the calls tile every file matrix, and the result equals the
    untiled path's (float32: to summation order; each tile's weights are the projection's rows, above)."""
    tile = 16
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", tile)
    fmt, pool = _pool(name)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 5):
        x = torch.randn(m, pool.hidden, generator=gen)
        want = _untiled_ffn(pool, 1, x)
        with recording(fmt) as calls:
            got = pool.ffn(1, x)
        mats = fmt.matrices(pool.hidden, pool.inter)
        expect = [(min(t, n - lo), k) for _, n, k in mats for t in [fmt.tile_rows(n, k)] for lo in range(0, n, t)]
        assert calls == expect
        assert max(c[0] for c in calls) <= max(tile, max(fmt.row_multiple(n, k) for _, n, k in mats))
        assert len(calls) > len(mats) or name == "fp8:128x128"  # tiled (128-row blocks: one tile of 36 rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        from moe_offload.kernels import cpu_gemv

        monkeypatch.setattr(cpu_gemv, "_activations", "exact")  # tiles here; the MXFP4 kernel is tested elsewhere
        bf = pool.ffn(1, x.bfloat16())
        assert bf.dtype == torch.bfloat16 and (bf.float() - want).abs().max() <= 0.05 * want.abs().max()


def test_tile_rows_round_to_the_formats_multiple(monkeypatch):
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", 24)
    cases = {"gptq:4,g32,sym": 8, "gptq:8,g32,sym": 4, "awq:4,g32": 8, "fp8:16x32": 16, "fp8:128x128": 128,
             "ct:2,g32,asym": 16, "ct:4,g32,asym": 8, "ct:8,ch,asym": 4, "ct:4,g32,sym": 1, "mxfp4": 1}
    for name, multiple in cases.items():
        fmt = get_format(name)
        assert fmt.row_multiple(H, MX_H) == multiple, name
        assert fmt.tile_rows(H, MX_H) == max(multiple, 24 // multiple * multiple), name
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", 512)
    assert get_format("mxfp4").tile_rows(5760, 2880) == 512 and get_format("fp8:128x128").tile_rows(4096, 7168) == 512


# --- end to end: tiny models per format, a tile smaller than their projections -------------------------------
TILE = 16


@pytest.fixture(scope="module")
def hf_float(tmp_path_factory):
    from helpers import make_hf_checkpoint

    d = tmp_path_factory.mktemp("tiles") / "float"
    make_hf_checkpoint(d, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)
    return d


def _transformers(folder, eos, **kw):
    """transformers' logits and greedy tokens of PROMPT on `folder`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager", **kw).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0]
        tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)[0, len(PROMPT):].tolist()
    return logits, tokens


def _run_tiled(folder, monkeypatch):
    """Ours on `folder` with TILE-row tiles, resident and offloaded: (model, logits, greedy tokens, offloaded
    tokens, every dequant_matrix (n, k) made while running); the loads (dense layers dequantized whole) are
    not recorded."""
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", TILE)
    ours = mo.load(folder, device="cpu", dtype="float32")
    with mo.load(folder, device="cpu", dtype="float32", cache_per_layer=2) as off:
        with recording(ours.model.experts.store.format) as calls:
            logits, tokens = ours.logits(PROMPT), ours.generate(PROMPT, max_new_tokens=12).token_ids
            r = off.generate(PROMPT, max_new_tokens=12)
    assert r.stats["misses"] > 0
    return ours, logits, tokens, r.token_ids, calls


def _assert_tiled(ours, calls):
    fmt, cfg = ours.model.experts.store.format, ours.config
    mats = fmt.matrices(cfg.hidden_size, cfg.intermediate_size)
    multiple = max(fmt.row_multiple(n, k) for _, n, k in mats)
    assert calls and max(n for n, _ in calls) <= max(TILE, multiple) < min(n for _, n, _ in mats)


@pytest.mark.parametrize("method,kw,expect", [
    ("gptq", dict(bits=4, group=32, sym=False, desc_act=True), "gptq:4,g32,asym,act"),
    ("awq", dict(group=32), "awq:4,g32")])
def test_gptq_awq_models_tiled_equal_transformers_on_the_spec(hf_float, tmp_path, monkeypatch, method, kw, expect):
    d = tmp_path / method
    convert_folder(hf_float, d, method, spec_folder=tmp_path / "spec", **kw)
    ours, logits, tokens, off_tokens, calls = _run_tiled(d, monkeypatch)
    assert ours.runtime.expert_format == expect
    want, ref = _transformers(tmp_path / "spec", list(ours.config.eos_token_ids))
    assert tokens == ref == off_tokens
    assert torch.allclose(logits, want, atol=1e-5, rtol=1e-5)
    _assert_tiled(ours, calls)


def test_fp8_model_tiled_equals_transformers_dequantized(hf_float, tmp_path, monkeypatch):
    """32 x 32 blocks, a 16-row tile: rounded up to the 32-row block, still a fraction of every projection."""
    from transformers import FineGrainedFP8Config

    d = tmp_path / "fp8"
    convert_folder(hf_float, d, "fp8", block=(32, 32))
    ours, logits, tokens, off_tokens, calls = _run_tiled(d, monkeypatch)
    assert ours.runtime.expert_format == "fp8:32x32"
    want, ref = _transformers(d, list(ours.config.eos_token_ids),
                              quantization_config=FineGrainedFP8Config(dequantize=True))
    assert tokens == ref == off_tokens
    assert torch.allclose(logits, want, atol=1e-5, rtol=1e-5)
    _assert_tiled(ours, calls)
    assert {n for n, _ in calls} == {32}


def test_compressed_tensors_model_tiled_equals_its_decompressor(hf_float, tmp_path, monkeypatch):
    """Asymmetric int4 in groups of 32 (zero points packed 8 rows a word), fp32 scales: the spec model is
    compressed-tensors' own decompression of each packed linear, run by transformers."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    sd = load_file(hf_float / "model.safetensors")
    out, spec = {}, dict(sd)
    for name, t in sd.items():
        if t.dim() == 2 and ("experts" in name or "self_attn" in name):
            wg = t.float().reshape(t.shape[0], -1, 32)
            scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            packed = PackedQuantizationCompressor.compress({"weight": t.float(), "weight_scale": scale.float(),
                                                             "weight_zero_point": zp}, scheme)
            out.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
            spec[name] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
        else:
            out[name] = t
    d, s = tmp_path / "ct", tmp_path / "spec"
    for folder, tensors in ((d, out), (s, spec)):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for f in hf_float.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                      "group_size": 32, "actorder": None}, "input_activations": None}},
                                  "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"]}
    (d / "config.json").write_text(json.dumps(cfg))
    ours, logits, tokens, off_tokens, calls = _run_tiled(d, monkeypatch)
    assert ours.runtime.expert_format == "ct:4,g32,asym,fp32"
    want, ref = _transformers(s, list(ours.config.eos_token_ids))
    assert tokens == ref == off_tokens
    assert torch.allclose(logits, want, atol=1e-5, rtol=1e-5)
    _assert_tiled(ours, calls)


def test_gpt_oss_mxfp4_model_tiled_equals_transformers(tmp_path, monkeypatch):
    """GPT-OSS (fused, interleaved gate_up with biases, clamped SwiGLU) with 16-row tiles = transformers'
    Mxfp4Config(dequantize=True) model: logits to float32 rounding, greedy tokens."""
    import transformers

    from helpers import rel_err
    from test_gpt_oss_mxfp4 import IDS, PROMPT as MX_PROMPT, build

    path, _ = build(tmp_path)
    oracle = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True),
        experts_implementation="eager").eval()
    with torch.no_grad():
        want = oracle(torch.tensor([IDS])).logits[0]
        ref = oracle.generate(torch.tensor([MX_PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    monkeypatch.setattr(weight_pool, "DEQUANT_TILE_ROWS", TILE)
    ours = mo.load(path, device="cpu", dtype="float32", config=OffloadConfig.make(cpu_activations="exact"))
    with recording(ours.model.experts.store.format) as calls:
        logits, tokens = ours.logits(IDS), ours.generate(MX_PROMPT, max_new_tokens=12).token_ids
    assert rel_err(logits, want) < 1e-4
    assert tokens == ref[0, len(MX_PROMPT):].tolist()
    _assert_tiled(ours, calls)
