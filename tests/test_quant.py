"""Quantized experts (issue 11): layout formula, quantize/pack round trip, and offloaded == resident
token for token for int8 and int4 at every capacity."""

from __future__ import annotations

import pytest
import torch

import moe_offload
from helpers import as_reference, group
from moe_offload.errors import MoeOffloadError
from moe_offload.formats import expert_bytes, get_format
from moe_offload.formats.int4 import dequant_int4, quantize_int4, unpack_int4
from moe_offload.formats.int8 import dequant_int8, quantize_int8
from moe_offload.options import OffloadConfig


@pytest.mark.parametrize("fmt,h,i,g", [("int8", 36, 22, 128), ("int4", 36, 22, 32), ("int4", 33, 17, 64),
                                       ("int4", 128, 256, 128)])
def test_layout_is_aligned_and_fills_expert_bytes(fmt, h, i, g):
    secs = get_format(fmt, g).layout(h, i)
    total = expert_bytes(h, i, fmt, g)
    assert all(s.offset % 16 == 0 for s in secs) and total % 16 == 0
    for a, b in zip(secs, secs[1:]):
        assert a.offset + a.nbytes <= b.offset < a.offset + a.nbytes + 16
    assert secs[-1].offset + secs[-1].nbytes <= total < secs[-1].offset + secs[-1].nbytes + 16


def test_expert_bytes_mixtral_8x7b():
    h, i = 4096, 14336
    assert expert_bytes(h, i, "bf16") == 3 * h * i * 2
    assert expert_bytes(h, i, "int8") == 3 * h * i + 2 * (2 * i + h)  # every section already 16-aligned
    assert expert_bytes(h, i, "int4", 128) == 3 * h * i // 2 + 4 * (2 * i * h // 128 + h * i // 128)


def test_int8_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 33)
    q, s = quantize_int8(w)
    err = (dequant_int8(q, s) - w).abs()
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert bool((err <= s.float()[:, None] / 2 * 1.001).all())
    assert int(q.abs().amax(1).min()) == 127  # the row maximum uses the full range


@pytest.mark.parametrize("k,g", [(33, 32), (64, 64), (130, 128), (7, 32)])
def test_int4_round_trip_within_half_a_step(k, g):
    torch.manual_seed(1)
    w = torch.randn(10, k) + 0.5
    packed, s, z = quantize_int4(w, g)
    assert packed.shape == (10, -(-k // 2)) and s.shape == z.shape == (10, -(-k // g))
    q = unpack_int4(packed, k)
    assert int(q.max()) <= 15
    err = (dequant_int4(packed, s, z, k, g) - w).abs()
    step = s.float()[:, torch.arange(k) // g]
    assert bool((err <= step * (0.5 + 8 * 2**-11) + 1e-6).all())  # fp16 scale rounding at the clipped max


def test_int4_nibble_order():
    w = torch.tensor([[0.0, 15.0, 3.0]])  # asymmetric: min 0 -> z 0, s 1: q = w
    packed, s, z = quantize_int4(w, 32, symmetric=False)
    assert float(s) == 1.0 and float(z) == 0.0
    assert packed.tolist() == [[0 | (15 << 4), 3]]


def test_int4_symmetric_is_compressed_tensors_rule():
    """Symmetric int4 (the default): s = max|w| / 7.5, q = clamp(round(w / s), -8, 7), stored as q + 8 with
    z = 8 -- compressed-tensors' own scale rule, checked against its quantize()."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(3)
    w = torch.randn(12, 128)
    packed, s, z = quantize_int4(w, 64)
    assert bool((z == 8).all())
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    wg = w.view(12, 2, 64)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    assert torch.equal(s, scale.to(torch.float16))
    q_ct = ct_quantize(w, s.float(), torch.zeros_like(s, dtype=torch.int8), args)  # signed, [-8, 7]
    assert torch.equal(unpack_int4(packed, 128).to(torch.int16) - 8, q_ct.to(torch.int16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_variants_round_trip_within_half_a_step(symmetric):
    torch.manual_seed(4)
    w = torch.randn(16, 96) - 0.3
    packed, s, z = quantize_int4(w, 32, symmetric)
    err = (dequant_int4(packed, s, z, 96, 32) - w).abs()
    step = s.float()[:, torch.arange(96) // 32]
    # symmetric: +max|w| sits at 7.5 steps and is clipped to 7 (half a step), within fp16's scale rounding
    assert bool((err <= step * (0.5 + 8 * 2**-11) + 1e-6).all())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_pool_views_dequantize_the_written_expert(fmt):
    torch.manual_seed(2)
    h, i, g = 36, 22, 32
    w1, w3, w2 = torch.randn(i, h), torch.randn(i, h), torch.randn(h, i)
    fmt = get_format(fmt, g)
    rows = torch.full((3, fmt.expert_bytes(h, i)), 255, dtype=torch.uint8)
    fmt.put(rows[1], w1, w3, w2, h, i)
    w13_d, w2_d = fmt.pool_views(rows, h, i).dequant(1, torch.float32)
    tol = 0.02 if fmt.name == "int8" else 0.3  # half a quantization step of randn weights
    torch.testing.assert_close(w13_d, torch.cat([w1, w3]), atol=tol, rtol=0)
    torch.testing.assert_close(w2_d, w2, atol=tol, rtol=0)


TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def resident_logits():
    out = {}
    for fmt, g in (("int8", 128), ("int4", 32)):
        # the dequantize-then-matmul twin of the offloaded run (the CPU ops: tests/test_quant_cpu.py)
        with as_reference(moe_offload.load(device="cpu", expert_dtype=fmt, offload=False,
                                           config=OffloadConfig.make(group_size=group(fmt, g)))) as m:
            ids = m.encode(TEXT)
            out[fmt] = (ids, m.logits(ids), m.generate(ids, max_new_tokens=8).token_ids)
    return out


@pytest.mark.parametrize("fmt,g", [("int8", 128), ("int4", 32)])
@pytest.mark.parametrize("slots", [2, 7, 48])  # below top_k * layers, odd, all
def test_offloaded_quantized_equals_resident_quantized(resident_logits, fmt, g, slots):
    ids, logits, tokens = resident_logits[fmt]
    with moe_offload.load(device="cpu", expert_dtype=fmt, predictor="none", config=OffloadConfig.make(group_size=group(fmt, g), cache_experts=slots)) as m:
        assert torch.equal(m.logits(ids), logits)
        res = m.generate(ids, max_new_tokens=8)
        assert res.token_ids == tokens
        st = m.cache_stats()
        assert st["bytes_h2d"] == st["misses"] * expert_bytes(128, 256, fmt, g)


def test_quantized_logits_close_to_fp32_and_differ_from_it(resident_logits):
    with moe_offload.load(device="cpu") as m:
        ids, _, _ = resident_logits["int8"]
        ref = m.logits(ids)
    for fmt in ("int8", "int4"):
        q = resident_logits[fmt][1]
        assert not torch.equal(q, ref)  # the experts really were quantized
        assert (q.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_bad_expert_options_are_one_line_errors():
    with pytest.raises(MoeOffloadError, match=r"tuning.group_size must be one of \[32, 64, 128\], got 48"):
        moe_offload.load(device="cpu", expert_dtype="int4", config=OffloadConfig.make(group_size=48))
    with pytest.raises(MoeOffloadError, match=r"expert_dtype must be one of .*, got 'int5'"):
        moe_offload.load(device="cpu", expert_dtype="int5")
    with pytest.raises(MoeOffloadError, match="needs the compute dtype bfloat16"):
        moe_offload.load(device="cpu", expert_dtype="bf16", dtype="float32")
