"""The CPU ops for quantized experts (the formats' cpu_linear, run by moe_offload/kernels/quant_cpu.py) against the
dequantize-then-matmul reference: per projection, per expert, through moe_loop, and on the bundled model.
Every test runs twice: with the compiled decode kernels (moe_offload/kernels/cpu_gemv.py; weights and scales read
in place, float32 accumulation, one rounding of the output) and with PyTorch's weight-only ops, the
fallback where the kernels cannot be built.

Tolerances. A projection's exact value is x @ W.T with W the dequantized weights (float64 here). The
int8 op multiplies by scales cast to the compute dtype and rounds its output to it; the int4 op computes
(q - 8) * s + (8 - z) * s with both terms rounded to the compute dtype. Each rounding is at most half an
eps of the term it rounds, so |y - exact| <= 2 * eps(dtype) * (|x| @ A.T) where A = |q| * s (int8) or
(|q - 8| + |8 - z|) * s (int4), plus float32 accumulation in any order: K * eps(float32) * (|x| @ A.T).
"""

from __future__ import annotations

import pytest
import torch

import moe_offload
from helpers import as_reference, group
from moe_offload.kernels import expert_ffn, moe_loop
from moe_offload.formats import expert_bytes, get_format
from moe_offload.formats.int4 import int4_linear, quantize_int4, unpack_int4
from moe_offload.formats.int8 import int8_linear, quantize_int8
from moe_offload.kernels import WeightPool, cpu_gemv
from moe_offload.kernels.quant_cpu import CpuQuantPool
from moe_offload.options import OffloadConfig

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_ops(request, monkeypatch):
    """'native': the compiled kernels; 'torch': PyTorch's ops, as where the kernels cannot be built."""
    if request.param == "native" and not cpu_gemv.available():
        pytest.skip(f"kernels not built: {cpu_gemv.why_unavailable()}")
    if request.param == "torch":
        monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    return request.param
FORMATS = [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]


def abs_weights(fmt: str, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, k: int, g: int) -> torch.Tensor:
    """A [N, K] float64 (see the module docstring)."""
    if fmt == "int8":
        return q.double().abs() * s.double()[:, None]
    col = torch.arange(k) // g
    qi = unpack_int4(q, k).double()
    return ((qi - 8).abs() + (8 - z.double()[:, col]).abs()) * s.double()[:, col]


def exact(fmt: str, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, k: int, g: int) -> torch.Tensor:
    """The dequantized weights [N, K] in float64."""
    if fmt == "int8":
        return q.double() * s.double()[:, None]
    col = torch.arange(k) // g
    return (unpack_int4(q, k).double() - z.double()[:, col]) * s.double()[:, col]


@pytest.mark.parametrize("fmt,g", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5])
def test_projection_within_rounding_of_the_dequantized_weights(fmt, g, dtype, m):
    torch.manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k) * 0.05
    w[3] += 0.2  # a row with an offset: int4 zero points away from 8
    x = torch.randn(m, k).to(dtype)
    if fmt == "int8":
        q, s = quantize_int8(w)
        z, lin = None, int8_linear(q, s, dtype)
    else:
        q, s, z = quantize_int4(w, g)
        lin = int4_linear(q, s, z, k, g, dtype)
    y = lin(x)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.double() @ exact(fmt, q, s, z, k, g).T
    bound = (2 * torch.finfo(dtype).eps + k * torch.finfo(torch.float32).eps) * (
        x.double().abs() @ abs_weights(fmt, q, s, z, k, g).T)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound[err.argmax() // n].max():.3g}"
    assert bound.mean() < 0.5 * ref.abs().mean()  # well below the values: a wrong nibble order or zero fails


def make_pool(fmt: str, g: int, hidden: int, inter: int, slots: int) -> WeightPool:
    torch.manual_seed(1)
    fmt = get_format(fmt, g)
    rows = torch.empty(slots, fmt.expert_bytes(hidden, inter), dtype=torch.uint8)
    for sl in range(slots):
        w1, w3 = torch.randn(inter, hidden) * 0.1, torch.randn(inter, hidden) * 0.1
        w2 = torch.randn(hidden, inter) * 0.1
        fmt.put(rows[sl], w1, w3, w2, hidden, inter)
    return fmt.pool_views(rows, hidden, inter)


# Whole MoE layer vs moe_loop on the dequantized pool in the same dtype. Both sides round each projection
# to the dtype, so they differ by a few roundings of the largest values: 8 eps of max |ref| (float32
# additionally gets sqrt(K) for the order of its accumulation).
def moe_tol(dtype: torch.dtype, ref: torch.Tensor, k: int) -> float:
    eps = torch.finfo(dtype).eps
    return 8 * eps * ref.abs().max().item() * (k ** 0.5 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("fmt,g", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 7])
def test_moe_loop_fast_path_matches_reference(fmt, g, dtype, tokens):
    hidden, inter, e, topk = 128, 256, 4, 2
    pool = make_pool(fmt, g, hidden, inter, e)
    fast = CpuQuantPool(pool, dtype, max_tokens=8)
    torch.manual_seed(2)
    h = torch.randn(tokens, hidden).to(dtype)
    ids = torch.stack([torch.randperm(e)[:topk] for _ in range(tokens)])  # [N, k]
    weights = torch.softmax(torch.randn(tokens, topk), -1)
    ref = moe_loop(h, ids, weights, pool, None)
    out = moe_loop(h, ids, weights, fast, None)
    assert out.dtype == dtype
    err = (out - ref).abs().max().item()
    assert err <= moe_tol(dtype, ref, inter), err
    assert not torch.equal(out, ref) or dtype == torch.bfloat16  # float32: really another kernel ran


def test_more_tokens_than_the_crossover_run_the_reference_bit_for_bit():
    pool = make_pool("int4", 32, 128, 256, 2)
    h = torch.randn(6, 128)
    ids = torch.tensor([[0, 1]] * 6)
    weights = torch.full((6, 2), 0.5)
    ref = moe_loop(h, ids, weights, pool, None)
    assert torch.equal(moe_loop(h, ids, weights, CpuQuantPool(pool, torch.float32, max_tokens=5), None), ref)
    assert not torch.equal(moe_loop(h, ids, weights, CpuQuantPool(pool, torch.float32, max_tokens=6), None), ref)


def test_int4_shapes_the_op_refuses_keep_the_reference():
    pool = make_pool("int4", 32, 128, 80, 2)  # w2's K = 80 is not a multiple of the group size
    fast = CpuQuantPool(pool, torch.float32)
    assert fast.w13[0] is not None and fast.w2[0] is None
    x = torch.randn(1, 128)
    assert torch.equal(fast.ffn(0, x), expert_ffn(x, *pool.dequant(0, torch.float32)))


def test_extra_ram_native_none_torch_the_cast_scales_for_int8_and_the_repacked_weights_for_int4(cpu_ops):
    h, i, g = 128, 256, 64
    p8 = CpuQuantPool(make_pool("int8", g, h, i, 3), torch.bfloat16)
    assert p8.w13[1].weight.data_ptr() == p8.pool.w13[1].data_ptr()  # int8 weights read in place
    p4 = CpuQuantPool(make_pool("int4", g, h, i, 3), torch.float32)
    if cpu_ops == "native":  # weights and scales read in place
        assert p8.extra_bytes == 0 and p4.extra_bytes == 0
        assert p4.w13[1].weight.data_ptr() == p4.pool.w13[1].data_ptr()
    else:
        assert p8.extra_bytes == 3 * (2 * i + h) * 2  # bf16 scales only
        assert p4.extra_bytes == 3 * (3 * h * i // 2 + 2 * 4 * (2 * i * h + h * i) // g)


@pytest.mark.parametrize("fmt,g", [("int4", 128), ("int4", 32)])
def test_bundled_model_float32_greedy_tokens_equal_reference(fmt, g):
    """float32: the ops differ from dequantize-then-matmul by float32 rounding only."""
    ids = None
    out = {}
    for kern in ("auto", "reference"):
        m = moe_offload.load(device="cpu", dtype="float32", expert_dtype=fmt, config=OffloadConfig.make(group_size=group(fmt, g)))
        with (as_reference(m) if kern == "reference" else m):
            ids = m.encode("In the beginning God created the heaven and the earth.")
            out[kern] = (m.logits(ids), m.generate(ids, max_new_tokens=12).token_ids)
    assert out["auto"][1] == out["reference"][1]
    ref = out["reference"][0]
    assert (out["auto"][0] - ref).abs().max() <= 64 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_float32_int8_keeps_the_reference_where_the_op_is_slower(cpu_ops):
    pool = make_pool("int8", 128, 128, 256, 1)
    assert CpuQuantPool(pool, torch.float32).max_tokens == 0  # float32: bit-equal to the offloaded loop
    if cpu_ops == "native":
        assert CpuQuantPool(pool, torch.bfloat16).max_tokens == cpu_gemv.QUANT_MAX_ROWS
        return
    assert CpuQuantPool(pool, torch.bfloat16).max_tokens > 0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bundled_model_bf16_logits_within_bf16_rounding(fmt):
    """bf16: scales are rounded to bf16 by the ops (the reference keeps them in float32 until the
    dequantized weight is rounded), so logits agree to a few bf16 roundings of the largest logit."""
    out = {}
    for kern in ("auto", "reference"):
        m = moe_offload.load(device="cpu", dtype="bfloat16", expert_dtype=fmt)
        with (as_reference(m) if kern == "reference" else m):
            ids = m.encode("In the beginning God created the heaven and the earth.")
            out[kern] = m.logits(ids).float()
    ref = out["reference"]
    err = (out["auto"] - ref).abs().max()
    assert 0 < err <= 4 * torch.finfo(torch.bfloat16).eps * ref.abs().max()


@pytest.mark.parametrize("fmt,g", [("int8", 128), ("int4", 64)])
def test_cpu_lane_runs_quantized_experts_with_the_cpu_ops(fmt, g, cpu_ops):
    """The hybrid CPU lane on an int8/int4 store (it once failed on QuantPool views): every miss computed
    on the host gives the resident reference's greedy tokens (float32: rounding only)."""
    from moe_offload.offload.cpu_lane import CpuLane, LaneCosts

    text = "In the beginning God created the heaven and the earth."
    with as_reference(moe_offload.load(device="cpu", expert_dtype=fmt, offload=False,
                                       config=OffloadConfig.make(group_size=group(fmt, g)))) as ref:
        expected = ref.generate(text, max_new_tokens=10).token_ids
    with moe_offload.load(device="cpu", expert_dtype=fmt, predictor="none", config=OffloadConfig.make(group_size=group(fmt, g), cache_experts=4, cpu_experts="off")) as m:
        lane = CpuLane(m.expert_cache.store, LaneCosts(copy_seconds=1.0, chunk_seconds=0.0, weight_seconds=0.01,
                                                       token_seconds=0.0))
        m.model.experts.cpu_lane = lane
        res = m.generate(text, max_new_tokens=10)
    assert res.stats["cpu_experts"] > 0 and res.token_ids == expected
    assert all(isinstance(p, CpuQuantPool) for p in lane.host.prepared.values()) and lane.host.prepared
    per_expert = lane.host.extra_bytes / len(lane.host.prepared)
    if cpu_ops == "native":
        assert per_expert == 0  # everything read in place
    else:  # int8: scales only; int4: repacked weights too
        assert (per_expert > expert_bytes(128, 256, fmt, g) // 2) == (fmt == "int4")


def test_cpu_quant_benchmark_smoke(tmp_path, cpu_ops):
    if cpu_ops == "torch":
        pytest.skip("runs in a subprocess, which the fallback switch does not reach")
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_quant.py"
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"command", "git_commit", "date", "device", "torch"} <= set(res)
    cands = {(k["format"], k["compute_dtype"], k["candidate"]) for k in res["kernels"]}
    assert ("int4 g128", "bfloat16", "weight_only_op") in cands and ("int8", "float32", "dequant_then_matmul") in cands
    assert all(k["us_per_expert"] > 0 and k["GB_s"] > 0 for k in res["kernels"])
    assert res["decode"]["bundled"]["int8 @float32"]["median_tok_s"] > 0
    assert "expert kernels" in r.stdout and "decode tok/s" in r.stdout
