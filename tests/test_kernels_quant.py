"""Triton fused_moe over packed pools (the int8 / int4 variants of the one kernel, dequantized in-kernel,
TRITON_INTERPRET=1 on CPU) against the torch dequantize-then-matmul loop over the same packed pool."""

import pytest
import torch

from moe_offload.formats import get_format
from moe_offload.kernels import TileConfig, fused_moe_quant, fused_moe_reference, resolve_moe_backend, run_experts
from moe_offload.options import OffloadConfig

# Kernel and reference dequantize to the same dtype-rounded weights; they differ only in fp32
# accumulation order and the one rounding of the SiLU*up intermediate: a few ulps of the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SMALL = TileConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)


def make_quant_case(t, e, k, h, i, fmt, group, dtype=torch.float32, seed=0, ids=None, extra_slots=2):
    g = torch.Generator().manual_seed(seed)
    s = e + extra_slots
    fmt = get_format(fmt, group)
    rows = torch.full((s, fmt.expert_bytes(h, i)), 0xFF, dtype=torch.uint8)  # unused slots: garbage
    slot_of = torch.randperm(s, generator=g)[:e].to(torch.int32)  # random residency
    for x in range(e):
        w1, w3 = (torch.randn(i, h, generator=g) / h ** 0.5 for _ in range(2))
        w2 = torch.randn(h, i, generator=g) / i ** 0.5
        fmt.put(rows[slot_of[x]], w1, w3, w2, h, i)
    pool = fmt.pool_views(rows, h, i)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, k] distinct
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    return hidden, ids, weights, pool, slot_of


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check(hidden, ids, w, pool, slot_of, dtype, config=SMALL):
    ref = fused_moe_reference(hidden, ids, w, pool, None, slot_of)
    out = torch.full_like(hidden, float("nan"))
    got = fused_moe_quant(hidden, ids, w, pool, slot_of, out=out, config=config, debug=True)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "output not fully written"
    err = rel_err(out, ref)
    assert err < TOL[dtype], err


@pytest.mark.parametrize("t", [1, 5, 19])
def test_int8_matches_dequant_reference(t):
    hidden, ids, w, pool, slot_of = make_quant_case(t, 6, 2, 45, 27, "int8", 32, seed=t)
    check(hidden, ids, w, pool, slot_of, torch.float32)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 19])
def test_int4_matches_dequant_reference_every_group_size(group, t):
    h, i = 2 * group + 14, group + 6  # odd widths: a partial last group, masked tile edges
    hidden, ids, w, pool, slot_of = make_quant_case(t, 5, 2, h, i, "int4", group, seed=group + t)
    check(hidden, ids, w, pool, slot_of, torch.float32)


@pytest.mark.parametrize("block_k", [16, 64])
def test_int4_block_k_smaller_and_larger_than_group(block_k):
    hidden, ids, w, pool, slot_of = make_quant_case(3, 4, 2, 70, 40, "int4", 32, seed=7)
    cfg = TileConfig(block_m=16, block_n=16, block_k=block_k, num_warps=4, num_stages=1)
    check(hidden, ids, w, pool, slot_of, torch.float32, config=cfg)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(fmt, dtype):
    hidden, ids, w, pool, slot_of = make_quant_case(4, 4, 2, 64, 32, fmt, 32, dtype=dtype, seed=3)
    check(hidden, ids, w, pool, slot_of, dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_all_tokens_on_one_expert(fmt):
    t = 21
    ids = torch.tensor([[2]] * t)
    hidden, ids, w, pool, slot_of = make_quant_case(t, 4, 1, 40, 24, fmt, 32, seed=11, ids=ids)
    check(hidden, ids, w, pool, slot_of, torch.float32)


def test_top8_of_128_experts_int4():
    hidden, ids, w, pool, slot_of = make_quant_case(2, 128, 8, 64, 32, "int4", 32, seed=5, extra_slots=0)
    check(hidden, ids, w, pool, slot_of, torch.float32)


def test_int4_nibble_order_matters():
    """Swapping the nibbles of every byte must change the output: the kernel reads low = even k."""
    hidden, ids, w, pool, slot_of = make_quant_case(3, 3, 1, 64, 32, "int4", 32, seed=2)
    ref = fused_moe_reference(hidden, ids, w, pool, None, slot_of)
    pool.w13.copy_((pool.w13 >> 4) | (pool.w13 << 4))
    got = fused_moe_quant(hidden, ids, w, pool, slot_of, config=SMALL)
    assert rel_err(got, ref) > 10 * TOL[torch.float32]


def test_run_experts_triton_with_quant_pool():
    hidden, ids, w, pool, slot_of = make_quant_case(3, 4, 2, 48, 32, "int8", 32, seed=9)
    assert resolve_moe_backend("triton", hidden.device, hidden.dtype, 48, 32) == "triton"
    got = run_experts("triton", hidden, ids, w, pool, None, slot_of)
    ref = fused_moe_reference(hidden, ids, w, pool, None, slot_of)
    assert rel_err(got, ref) < TOL[torch.float32]


def test_bad_hidden_size_names_it():
    hidden, ids, w, pool, slot_of = make_quant_case(2, 3, 1, 48, 32, "int8", 32)
    with pytest.raises(ValueError, match="hidden size 48"):
        fused_moe_quant(hidden[:, :40].contiguous(), ids, w, pool, slot_of)


def test_bundled_model_int4_triton_backend_matches_loop():
    """--expert-dtype int4 --moe-backend triton end to end: logits match the loop backend's."""
    import moe_offload

    text = "In the beginning"
    logits = {}
    for backend in ("loop", "triton"):
        with moe_offload.load(device="cpu", expert_dtype="int4", offload=False, config=OffloadConfig.make(group_size=32, moe_backend=backend)) as m:
            ids = m.encode(text)
            logits[backend] = m.logits(ids)
    assert rel_err(logits["triton"], logits["loop"]) < 1e-4  # fp32 through several layers


def test_gpu_check_flags_quant_rows_over_tolerance():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = {"shape": "mixtral", "fmt": "int4", "group": 32, "tokens": 4, "max_rel_diff": 0.5}
    assert mod.section_failures("quant_kernels", {"rows": [row]})
    assert not mod.section_failures("quant_kernels", {"rows": [dict(row, max_rel_diff=1e-3)]})
    assert mod.section_failures("quant_kernels", {"rows": [dict(row, max_rel_diff=float("nan"))]})
