"""The compiled CPU decode kernels (moe_offload/kernels/csrc/cpu_gemv.cpp) against dequantize-then-matmul in float64.

Each kernel widens weights to float32 and accumulates in float32: against a float64 reference its
error is float32 round-off over K terms (tolerance 1e-5 relative to the output's scale), and a
bfloat16 output is within one bfloat16 rounding (2^-8 relative) of the reference. Rows of x are
computed independently: a row's result does not depend on how many rows share the call.

These exact-activation tests run with cpu_gemv's activations mode 'exact' (fixture below). The 8-bit
activation paths (mode 'int8') are checked at the end: their rounding of x equals gguf.quants' Q8_0
quantizer (llama.cpp's), and their product equals float64 W @ x' for x' the rounded x, to float32 round-off.
"""

import pytest
import torch

from moe_offload.formats.int4 import dequant_int4, quantize_int4
from moe_offload.formats.int8 import dequant_int8, quantize_int8
from moe_offload.kernels import cpu_gemv
from helpers import rounded_x

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"kernels not built: {cpu_gemv.why_unavailable()}")

F32_TOL = 1e-5  # x float32 round-off over K terms, relative to max |y|
BF16_TOL = 2.0 ** -8  # one bfloat16 rounding of the output, relative to max |y|


@pytest.fixture(autouse=True)
def activations_mode(request):
    """Every test runs in mode 'exact' unless it asks for another with @pytest.mark.activations(mode)."""
    mark = request.node.get_closest_marker("activations")
    before = cpu_gemv.activations()
    cpu_gemv.set_activations(mark.args[0] if mark else "exact")
    yield
    cpu_gemv.set_activations(before)


def check(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("n,k", [(512, 1024), (37, 100), (16, 64), (1, 3)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_float_kernels_equal_float64_matmul(n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    check(cpu_gemv.linear(x, w), x.double() @ w.double().T, F32_TOL)
    wb = w.bfloat16()
    check(cpu_gemv.linear(x, wb), x.double() @ wb.double().T, F32_TOL)
    xb = x.bfloat16()
    y = cpu_gemv.linear(xb, wb)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    check(y, xb.double() @ wb.double().T, BF16_TOL)


@pytest.mark.parametrize("n,k", [(512, 1024), (37, 100)])
def test_int8_kernel_equals_dequantize_then_matmul(n, k):
    g = torch.Generator().manual_seed(n + k)
    q, s = quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(4, k, generator=g)
    check(cpu_gemv.int8_linear(x, q, s), x.double() @ dequant_int8(q, s).double().T, F32_TOL)
    xb = x.bfloat16()
    check(cpu_gemv.int8_linear(xb, q, s), xb.double() @ dequant_int8(q, s).double().T, BF16_TOL)


@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_equals_dequantize_then_matmul(group, symmetric):
    n, k = 96, 512
    g = torch.Generator().manual_seed(group)
    q, s, z = quantize_int4(torch.randn(n, k, generator=g), group, symmetric=symmetric)
    x = torch.randn(3, k, generator=g)
    ref = x.double() @ dequant_int4(q, s, z, k, group).double().T
    check(cpu_gemv.int4_linear(x, q, s, z, group), ref, F32_TOL)


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int4"])
def test_a_row_does_not_depend_on_the_rows_beside_it(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 1024, generator=g)
    x = torch.randn(8, 1024, generator=g).bfloat16()
    if kind == "f32":  # one row of x: four weight rows at a time (302 x 1000: partial fours, K's tails)
        w, x = torch.randn(302, 1000, generator=g), torch.randn(8, 1000, generator=g)
        run = lambda x: cpu_gemv.linear(x, w)  # noqa: E731
    elif kind == "bf16":
        run = lambda x: cpu_gemv.linear(x, w.bfloat16())  # noqa: E731
    elif kind == "int8":
        q, s = quantize_int8(w)
        run = lambda x: cpu_gemv.int8_linear(x, q, s)  # noqa: E731
    else:
        q, s, z = quantize_int4(w, 32)
        run = lambda x: cpu_gemv.int4_linear(x, q, s, z, 32)  # noqa: E731
    together = run(x)
    for i in range(8):
        assert torch.equal(run(x[i:i + 1]), together[i:i + 1])


def test_bad_shapes_are_refused_in_one_line():
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        cpu_gemv._ext.gemv_float(torch.randn(1, 10), torch.randn(4, 12))
    q, s, z = quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(RuntimeError, match="group size 48"):
        cpu_gemv._ext.gemv_int4(torch.randn(1, 64), q, s, z, 48)


def test_threads_default_to_the_physical_cores_and_can_be_set(monkeypatch):
    import psutil

    from moe_offload import OffloadConfig, runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        runtime.load(config=OffloadConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        runtime.load(device="cpu")
        assert torch.get_num_threads() == (psutil.cpu_count(logical=False) or 1)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="threads"):
        OffloadConfig(threads=0)


def test_default_threads_respect_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    import os

    import psutil

    from moe_offload import runtime

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert runtime.default_threads() == 8  # physical cores, not hyperthreads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runtime.default_threads() == 2  # taskset -c 0-3: 4 of 16 logical CPUs = 2 cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 3)
    assert runtime.default_threads() == 3  # docker --cpus 2.5
    monkeypatch.undo()
    f = tmp_path / "cpu.max"
    f.write_text("250000 100000\n")
    assert runtime.cgroup_cpu_quota(str(f)) == 3
    f.write_text("max 100000\n")
    assert runtime.cgroup_cpu_quota(str(f)) is None
    assert runtime.cgroup_cpu_quota(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("block_type", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("m", [1, 5])
def test_gguf_kernels_equal_gguf_dequantize_then_matmul(block_type, m):
    """Oracle: the gguf package's own quantizer and dequantizer (maintained with llama.cpp)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qt = getattr(GGMLQuantizationType, block_type)
    g = torch.Generator().manual_seed(m)
    w = torch.randn(48, 256, generator=g).numpy()
    rows = quants.quantize(w, qt)  # uint8 [48, 8 blocks * bytes]
    deq = torch.from_numpy(np.asarray(quants.dequantize(rows, qt), dtype=np.float64))  # [48, 256]
    x = torch.randn(m, 256, generator=g)
    y = cpu_gemv.gguf_linear(x, torch.from_numpy(np.ascontiguousarray(rows)), block_type)
    check(y, x.double() @ deq.T, F32_TOL)


@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_is_bit_equal_to_the_torch_reference_then_cast(group, dtype, monkeypatch):
    q, s, z = quantize_int4(torch.randn(64, 256), group, symmetric=False)
    q8, s8 = quantize_int8(torch.randn(64, 200))
    fast4, fast8 = dequant_int4(q, s, z, 256, group, dtype), dequant_int8(q8, s8, dtype)
    assert fast4.dtype == fast8.dtype == dtype
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)  # the torch reference
    assert torch.equal(fast4, dequant_int4(q, s, z, 256, group, dtype))
    assert torch.equal(fast8, dequant_int8(q8, s8, dtype))


def test_dense_int8_weights_run_the_int8_kernel_within_rounding_of_their_dequantized_twin(monkeypatch):
    """dense_dtype='int8': attention projections and the LM head become int8 rows (their float storage
    released); decode through the int8 kernel equals dequantize-then-matmul within bf16 rounding."""
    from moe_offload import OffloadConfig, runtime

    m = runtime.load(config=OffloadConfig(device="cpu", dtype="bfloat16", dense_dtype="int8", cpu_activations="exact"))
    w = m.model.layers[0].qkv_proj
    q, s = w.int8_rows
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and w.numel() == 0
    assert m.model.lm_head.int8_rows[0].shape == (m.config.vocab_size, m.config.hidden_size)
    ids = m.encode("In the beginning God created the heaven and the earth.")
    kernel = m.generate(ids, max_new_tokens=12)
    plain = runtime.load(config=OffloadConfig(device="cpu", dtype="bfloat16"))
    assert kernel.token_ids != [] and plain.generate(ids, max_new_tokens=12).token_ids
    fast = m.logits(ids[:3]).float()  # 3 rows: the int8 kernel
    monkeypatch.setattr(cpu_gemv, "QUANT_MAX_ROWS", 0)  # the dequantized twin through F.linear
    slow = m.logits(ids[:3]).float()
    err = (fast - slow).abs().max().item()
    assert err <= 4 * BF16_TOL * slow.abs().max().item(), err  # measured 1.7x


def test_dense_int8_is_refused_where_it_cannot_run():
    from moe_offload import MoeOffloadError, OffloadConfig

    with pytest.raises(MoeOffloadError, match="dense_dtype int8 and speculative"):
        OffloadConfig(dense_dtype="int8", speculative=True)
    with pytest.raises(MoeOffloadError, match="dense_dtype"):
        OffloadConfig(dense_dtype="int4")


# ---- 8-bit activations -------------------------------------------------------------------------------
needs_vnni = pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="no AVX512-VNNI")


@needs_vnni
@pytest.mark.parametrize("m", [1, 5])
def test_activation_rounding_equals_gguf_q8_0(m):
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g) * torch.rand(m, 256, generator=g).pow(4) * 10  # uneven blocks
    x[0, :32] = 0  # an all-zero block: d = 0, q = 0
    x[0, 32:64] = torch.arange(32) / 127 * 5 - 2.5 / 127  # exact halves: round away from zero
    q, d = cpu_gemv._ext.quantize_activations(x)
    blocks = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)
    assert torch.equal(q.reshape(-1, 32), torch.from_numpy(blocks[:, 2:].copy()).view(torch.int8))
    assert torch.equal(d.reshape(-1).half(), torch.from_numpy(blocks[:, :2].copy()).view(torch.float16).reshape(-1))


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("m", [1, 3, 6])
def test_int8_activations_int8_weights_equal_float64_of_rounded_x(m):
    g = torch.Generator().manual_seed(10 + m)
    q, s = quantize_int8(torch.randn(300, 1024, generator=g))
    x = torch.randn(m, 1024, generator=g)
    check(cpu_gemv.int8_linear(x, q, s), rounded_x(x) @ dequant_int8(q, s).double().T, F32_TOL)
    exact = x.double() @ dequant_int8(q, s).double().T  # the rounding moves y by about one bf16 rounding
    assert (cpu_gemv.int8_linear(x, q, s).double() - exact).abs().max() > F32_TOL * exact.abs().max()


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("group", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_activations_int4_weights_equal_float64_of_rounded_x(group, symmetric):
    n, k = 96, 512  # K a multiple of 128: the 128-weight steps (int4_a8_wide); below, 64-weight chunks
    _int4_a8_case(n, k, group, symmetric)


@pytest.mark.activations("int8")
@pytest.mark.parametrize("group", [32, 64, 192])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_activations_int4_weights_of_k_not_a_multiple_of_128(group, symmetric):
    _int4_a8_case(40, 576, group, symmetric)


def _int4_a8_case(n, k, group, symmetric):
    g = torch.Generator().manual_seed(group + symmetric)
    q, s, z = quantize_int4(torch.randn(n, k, generator=g), group, symmetric=symmetric)
    x = torch.randn(5, k, generator=g)
    ref = rounded_x(x) @ dequant_int4(q, s, z, k, group).double().T
    check(cpu_gemv.int4_linear(x, q, s, z, group, symmetric=symmetric), ref, F32_TOL)


# random valid blocks for the types gguf.quants cannot quantize: (block bytes, blocks per 256 weights, byte
# offsets of fp16 scales set to small finite values, of e8m0 exponents set near 127)
RANDOM_BLOCKS = {"MXFP4": (17, 8, (), (0,)), "Q4_K": (144, 1, (0, 2), ()), "Q6_K": (210, 1, (208,), ())}


def random_blocks(block_type: str, n: int, g: torch.Generator, k: int = 256) -> torch.Tensor:
    nbytes, per256, halves, exps = RANDOM_BLOCKS[block_type]
    nb = per256 * k // 256
    rows = torch.randint(0, 256, (n, nb, nbytes), dtype=torch.uint8, generator=g)
    for at in halves:
        rows[:, :, at:at + 2] = (torch.rand(n, nb, 1, generator=g) * 0.02).half().view(torch.uint8)
    for at in exps:
        rows[:, :, at] = torch.randint(120, 132, (n, nb), dtype=torch.uint8, generator=g)
    return rows.reshape(n, -1)


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("block_type", ["Q8_0", "Q4_0", "MXFP4", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,k", [(1, 256), (5, 256), (3, 768), (2, 320)])
def test_int8_activations_gguf_weights_equal_gguf_dequantize_of_rounded_x(block_type, m, k):
    """Oracle: gguf.quants' dequantizer (random valid blocks for the types the package cannot quantize);
    K = 768 is three K-quant super-blocks; K = 320 (not a multiple of 128) takes Q4_0's 64-weight chunks."""
    if k % 256 and block_type in ("Q4_K", "Q6_K"):
        pytest.skip("K-quant rows are whole 256-weight super-blocks")
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qt = getattr(GGMLQuantizationType, block_type)
    g = torch.Generator().manual_seed(m + k)
    if block_type in RANDOM_BLOCKS:
        rows = random_blocks(block_type, 48, g, k).numpy()
    else:
        rows = quants.quantize(torch.randn(48, k, generator=g).numpy(), qt)
    deq = torch.from_numpy(np.asarray(quants.dequantize(rows, qt), dtype=np.float64))  # [48, K]
    x = torch.randn(m, k, generator=g)
    y = cpu_gemv.gguf_linear(x, torch.from_numpy(np.ascontiguousarray(rows)), block_type)
    check(y, rounded_x(x) @ deq.T, F32_TOL)


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("block_type", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,k", [(1, 256), (5, 768), (9, 1024)])
def test_int8_activations_repacked_k_quants_equal_gguf_dequantize_of_rounded_x(block_type, m, k):
    """Q4_K / Q6_K rows repacked for RAM (formats.gguf.REPACKED): the kernel against gguf.quants' dequantizer
    of the file's blocks, and the repacked rows' own dequantization bit-equal to it. K = 256 and 768: Q4_K's
    mins in a half-vector tail (8 and 24 sub-blocks)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from moe_offload.formats.gguf import REPACKED

    g = torch.Generator().manual_seed(m + k)
    rows = random_blocks(block_type, 40, g, k)
    deq = np.asarray(quants.dequantize(rows.numpy(), getattr(GGMLQuantizationType, block_type)), dtype=np.float32)
    packed = REPACKED[block_type].repack([rows[None]], k)
    assert np.array_equal(packed.dequant(0, 0, 40).numpy().view(np.uint32), deq.view(np.uint32))
    x = torch.randn(m, k, generator=g)
    y = packed.kernel(x, *packed.slot(0))
    check(y, rounded_x(x) @ torch.from_numpy(deq).double().T, F32_TOL)


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-asym", "Q4_0", "Q8_0", "Q4_K-repacked", "Q6_K-repacked"])
def test_int8_activations_a_row_does_not_depend_on_the_rows_beside_it(kind):
    # one row of x runs four weight rows at a time (302 rows: the threads' shares end in partial fours),
    # several rows of x one weight row at a time: the same sums either way
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(1)
    w = torch.randn(302, 1024, generator=g)
    x = torch.randn(9, 1024, generator=g).bfloat16()
    if kind == "int8":
        q, s = quantize_int8(w)
        run = lambda x: cpu_gemv.int8_linear(x, q, s)  # noqa: E731
    elif kind.startswith("int4"):
        q, s, z = quantize_int4(w, 32, symmetric=kind == "int4")
        run = lambda x: cpu_gemv.int4_linear(x, q, s, z, 32, symmetric=kind == "int4")  # noqa: E731
    elif kind.endswith("-repacked"):
        from moe_offload.formats.gguf import REPACKED

        block_type = kind.removesuffix("-repacked")
        packed = REPACKED[block_type].repack([random_blocks(block_type, 302, g, 1024)[None]], 1024)
        run = lambda x: packed.kernel(x, *packed.slot(0))  # noqa: E731
    else:
        qtype = getattr(GGMLQuantizationType, kind)
        rows = torch.from_numpy(np.ascontiguousarray(quants.quantize(w.numpy(), qtype)))
        run = lambda x: cpu_gemv.gguf_linear(x, rows, kind)  # noqa: E731
    together = run(x)
    for i in range(9):
        assert torch.equal(run(x[i:i + 1]), together[i:i + 1])


@needs_vnni
def test_activations_mode_auto_rounds_half_precision_only():
    cpu_gemv.set_activations("auto")
    assert cpu_gemv.int8_activations(torch.zeros(1, 64, dtype=torch.bfloat16), 64)
    assert not cpu_gemv.int8_activations(torch.zeros(1, 64), 64)
    assert not cpu_gemv.int8_activations(torch.zeros(1, 96, dtype=torch.bfloat16), 96)  # K not a multiple of 64
    cpu_gemv.set_activations("int8")
    assert cpu_gemv.int8_activations(torch.zeros(1, 64), 64)
    with pytest.raises(ValueError, match="activations mode"):
        cpu_gemv.set_activations("int4")


def test_cpu_activations_option_is_validated_and_int8_refused_without_vnni(monkeypatch):
    from moe_offload import MoeOffloadError, OffloadConfig, runtime

    with pytest.raises(MoeOffloadError, match="cpu_activations"):
        OffloadConfig(cpu_activations="fp8")
    monkeypatch.setattr(cpu_gemv, "has_vnni", lambda: False)
    with pytest.raises(MoeOffloadError, match="cpu_activations 'int8'.*VNNI"):
        runtime.load(config=OffloadConfig(device="cpu", cpu_activations="int8"))


@needs_vnni
@pytest.mark.activations("int8")
@pytest.mark.parametrize("m", [1, 5])
def test_int8_activations_gpt_oss_mxfp4_equal_float64_of_rounded_x(m):
    """Oracle for the weights: formats.mxfp4.dequant_mxfp4, bit-equal to transformers' own MXFP4
    dequantizer (tests/test_gpt_oss_mxfp4.py)."""
    from moe_offload.formats.mxfp4 import dequant_mxfp4

    g = torch.Generator().manual_seed(m)
    blocks = torch.randint(0, 256, (96, 16, 16), dtype=torch.uint8, generator=g)  # [N, K/32, 16], K = 512
    scales = torch.randint(118, 132, (96, 16), dtype=torch.uint8, generator=g)
    x = torch.randn(m, 512, generator=g)
    check(cpu_gemv.mxfp4_linear(x, blocks, scales), rounded_x(x) @ dequant_mxfp4(blocks, scales).double().T, F32_TOL)


@needs_vnni
@pytest.mark.parametrize("mode", ["int8", "exact"])
def test_gguf_gate_and_up_in_one_call_equal_two_calls(mode):
    """GgufPool runs gate and up of one type in one call (x rounded once): the same numbers as two calls."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    cpu_gemv.set_activations(mode)
    g = torch.Generator().manual_seed(5)
    gate, up = (torch.from_numpy(np.ascontiguousarray(quants.quantize(torch.randn(40, 256, generator=g).numpy(),
                                                                      GGMLQuantizationType.Q4_0))) for _ in range(2))
    x = torch.randn(3, 256, generator=g).bfloat16()
    both = cpu_gemv.gguf_linear(x, [gate, up], "Q4_0")
    assert both.shape == (3, 80)
    assert torch.equal(both, torch.cat([cpu_gemv.gguf_linear(x, gate, "Q4_0"), cpu_gemv.gguf_linear(x, up, "Q4_0")], -1))



@needs_vnni
@pytest.mark.activations("int8")
def test_int8_activation_kernels_take_bf16_in_and_out_as_float32_rounded_once():
    """bf16 x goes in as float32 (exact) and y comes out as the float32 result rounded once to bf16."""
    from moe_offload.formats.mxfp4 import BLOCK

    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 512, generator=g)
    q8, s8 = quantize_int8(w)
    q4, s4, z4 = quantize_int4(w, 32)
    rows = random_blocks("Q4_K", 64, g, 512)
    blocks = torch.randint(0, 256, (64, 512 // BLOCK, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 132, (64, 512 // BLOCK), dtype=torch.uint8, generator=g)
    xb = torch.randn(3, 512, generator=g).bfloat16()
    for run in (lambda x: cpu_gemv.int8_linear(x, q8, s8), lambda x: cpu_gemv.int4_linear(x, q4, s4, z4, 32, True),
                lambda x: cpu_gemv.gguf_linear(x, rows, "Q4_K"), lambda x: cpu_gemv.mxfp4_linear(x, blocks, scales)):
        y = run(xb)
        assert y.dtype == torch.bfloat16 and torch.equal(y, run(xb.float()).bfloat16())


@needs_vnni
@pytest.mark.activations("int8")
def test_a_nan_in_the_activations_stays_nan():
    q, s = quantize_int8(torch.randn(16, 128))
    x = torch.randn(2, 128)
    x[1, 70] = float("nan")
    y = cpu_gemv.int8_linear(x, q, s)
    assert y[0].isfinite().all() and y[1].isnan().all()
    assert cpu_gemv.int8_linear(x.bfloat16(), q, s)[1].isnan().all()
