"""The compiled CPU decode kernels (moe_offload/kernels/csrc/cpu_gemv.cpp) against dequantize-then-matmul in float64.

Each kernel widens weights to float32 and accumulates in float32: against a float64 reference its
error is float32 round-off over K terms (tolerance 1e-5 relative to the output's scale), and a
bfloat16 output is within one bfloat16 rounding (2^-8 relative) of the reference. Rows of x are
computed independently: a row's result does not depend on how many rows share the call.
"""

import pytest
import torch

from moe_offload.formats.int4 import dequant_int4, quantize_int4
from moe_offload.formats.int8 import dequant_int8, quantize_int8
from moe_offload.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"kernels not built: {cpu_gemv.why_unavailable()}")

F32_TOL = 1e-5  # x float32 round-off over K terms, relative to max |y|
BF16_TOL = 2.0 ** -8  # one bfloat16 rounding of the output, relative to max |y|


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


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_a_row_does_not_depend_on_the_rows_beside_it(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 1024, generator=g)
    x = torch.randn(8, 1024, generator=g).bfloat16()
    if kind == "bf16":
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


@pytest.mark.parametrize("group", [32, 128])
def test_int4_dequantization_is_bit_equal_to_the_torch_reference(group, monkeypatch):
    q, s, z = quantize_int4(torch.randn(64, 256), group, symmetric=False)
    fast = cpu_gemv.dequant_int4(q, s, z, group)
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    assert torch.equal(fast, dequant_int4(q, s, z, 256, group))


def test_dense_int8_weights_run_the_int8_kernel_within_rounding_of_their_dequantized_twin(monkeypatch):
    """dense_dtype='int8': attention projections and the LM head become int8 rows (their float storage
    released); decode through the int8 kernel equals dequantize-then-matmul within bf16 rounding."""
    from moe_offload import OffloadConfig, runtime

    m = runtime.load(config=OffloadConfig(device="cpu", dtype="bfloat16", dense_dtype="int8"))
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
