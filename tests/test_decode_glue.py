"""The decode-step glue (cpu_gemv.rms_norm, attn_decode, experts_decode): one compiled call each for what a
one-token step does between its weight products. Oracles are not ours: transformers' RMSNorm and RoPE,
PyTorch's ops in the order reference.expert_ffn runs them, and attention in float64.

Rounding: RMSNorm and the experts round every intermediate to the activation dtype as PyTorch's ops do,
so bfloat16 results equal the oracle's bit for bit except where RMSNorm's float32 sum of squares (added
in another order) moves a rounding: then by one bfloat16 step. Float32 results agree to float32 round-off.
Attention adds its float32 sums in its own order: within 1e-5 (float32) or one bfloat16 rounding of its
output (bfloat16) of float64 attention over the same rotated keys.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import moe_offload as mo
from moe_offload.kernels import cpu_gemv
from moe_offload.model.layers import rope_tables

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"kernels not built: {cpu_gemv.why_unavailable()}")

F32_TOL = 1e-5  # float32 round-off, relative to the output's scale
BF16_STEP = 2.0 ** -8  # one bfloat16 rounding, relative (one step between neighbours: up to twice that)


def count_moe_runs(monkeypatch, calls: list[int]) -> None:
    """Count calls[0] up for every run of a compiled MoE decode step (cpu_gemv.moe_decode's plans)."""
    real = cpu_gemv.moe_decode

    class Counted:
        def __init__(self, plan):
            self.plan = plan

        def run(self, *a):
            calls[0] += 1
            return self.plan.run(*a)

    monkeypatch.setattr(cpu_gemv, "moe_decode", lambda *a, **k: Counted(real(*a, **k)))


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 1, 16, 64), (3, 100)])
def test_rms_norm_equals_transformers(dtype, w_dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    # a float32 weight under bfloat16 x scales in float32, then casts: GPT-OSS's norm (Family.norms_float32)
    norm = (GptOssRMSNorm if w_dtype != dtype else LlamaRMSNorm)(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    norm = norm.to(w_dtype)
    got = cpu_gemv.rms_norm(x, norm.weight.detach(), 1e-6)
    with torch.no_grad():
        want = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        close(got, want, F32_TOL)
    else:
        steps = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
        assert steps.max().item() <= 2 * BF16_STEP, "more than one bfloat16 step from transformers"
        assert (got == want).float().mean().item() > 0.98  # a moved rounding is the exception


def _attention64(q, k, v, lo, sinks=None):
    """q [nh, hd], k/v [nkv, S, hd] (keys lo..S-1 visible) -> [nh, hd] in float64; sinks [nh] dropped."""
    nh, hd = q.shape
    rep = nh // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0)[:, lo:], v.double().repeat_interleave(rep, 0)[:, lo:]
    s = torch.einsum("hd,hsd->hs", q.double(), k) / math.sqrt(hd)
    if sinks is not None:
        s = torch.cat((s, sinks.double()[:, None]), dim=1)
    p = torch.softmax(s, dim=1)
    if sinks is not None:
        p = p[:, :-1]
    return torch.einsum("hs,hsd->hd", p, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,sinks,rd", [(None, False, 64), (5, False, 64), (None, True, 64), (None, False, 32)])
def test_attn_decode_rotates_writes_the_cache_and_attends(dtype, window, sinks, rd):
    nh, nkv, hd, S, pos = 8, 2, 64, 32, 11
    g = torch.Generator().manual_seed(pos + rd + (window or 0))
    qkv = torch.randn(nh + 2 * nkv, hd, generator=g).to(dtype)
    kc = torch.randn(nkv, S, hd, generator=g).to(dtype)
    vc = torch.randn(nkv, S, hd, generator=g).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    cos, sin = rope_tables(rd, 10000.0, S, dtype, torch.device("cpu"))
    sk = torch.randn(nh, generator=g) if sinks else None
    o = cpu_gemv.attn_decode(qkv, cos[pos], sin[pos], kc, vc, pos, nh, nkv, rd, window, hd ** -0.5, sk)
    # transformers' RoPE on the leading rd dims of each head, in the same dtype: the rotated q and k
    x = qkv.view(1, nh + 2 * nkv, 1, hd)
    rq, rk = apply_rotary_pos_emb(x[:, :nh, :, :rd], x[:, nh:nh + nkv, :, :rd], cos[pos:pos + 1][None],
                                  sin[pos:pos + 1][None])
    q = torch.cat((rq, x[:, :nh, :, rd:]), dim=-1)[0, :, 0]  # [nh, hd]
    k = torch.cat((rk, x[:, nh:nh + nkv, :, rd:]), dim=-1)[0, :, 0]  # [nkv, hd]
    assert torch.equal(kc[:, pos], k) and torch.equal(vc[:, pos], qkv[nh + nkv:])  # written, bit for bit
    others = [p for p in range(S) if p != pos]
    assert torch.equal(kc[:, others], kc0[:, others]) and torch.equal(vc[:, others], vc0[:, others])
    lo = 0 if window is None else max(0, pos - window + 1)
    want = _attention64(q, kc[:, :pos + 1], vc[:, :pos + 1], lo, sk)
    assert o.shape == (1, nh * hd) and o.dtype == dtype
    close(o.view(nh, hd), want, F32_TOL if dtype == torch.float32 else 2 * BF16_STEP)


def _experts_torch(x, w13s, w2s, weights):
    """reference.expert_ffn's PyTorch ops for one token, accumulated as moe_loop does."""
    out = torch.zeros_like(x)
    for w13, w2, w in zip(w13s, w2s, weights):
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2)
        out.add_(y.mul_(torch.tensor(w, dtype=torch.float32)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_decode_equals_the_pytorch_ops(dtype):
    H, I, k = 256, 192, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, H, generator=g).to(dtype)
    w13s = [(torch.randn(2 * I, H, generator=g) / 16).to(dtype) for _ in range(k)]
    w2s = [(torch.randn(H, I, generator=g) / 16).to(dtype) for _ in range(k)]
    weights = torch.rand(k, generator=g).tolist()
    out = torch.zeros(1, H, dtype=dtype)
    cpu_gemv.experts_decode(x, w13s, w2s, torch.tensor([0.0] + weights[::-1]), [3, 2, 1], out)  # weights by column
    # the products: our gemv against x as stored (as cpu_gemv.linear); the glue around them: PyTorch's ops
    want = torch.zeros_like(x)
    for w13, w2, w in zip(w13s, w2s, weights):
        gate, up = cpu_gemv.linear(x, w13).chunk(2, dim=-1)
        want.add_(cpu_gemv.linear(F.silu(gate) * up, w2).mul_(torch.tensor(w)))
    assert torch.equal(out, want)
    close(out, _experts_torch(x.double(), [w.double() for w in w13s], [w.double() for w in w2s], weights),
          F32_TOL if dtype == torch.float32 else 8 * BF16_STEP)


def test_bad_shapes_are_refused_in_one_line():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match=r"expert 0: w13 must be \[2I, 64\]"):
        cpu_gemv.experts_decode(x, [torch.randn(10, 32)], [torch.randn(64, 5)], torch.ones(1), [0], torch.zeros(1, 64))
    with pytest.raises(RuntimeError, match="the caches must be"):
        cpu_gemv.attn_decode(torch.randn(6 * 16), torch.ones(16), torch.zeros(16), torch.zeros(2, 4, 16),
                             torch.zeros(2, 4, 16), 4, 2, 2, 16, None, 0.25, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_decodes_the_same_tokens_with_and_without_the_glue(dtype, monkeypatch):
    # the bundled model's greedy tokens: the glue changes attention's float32 summation order only
    with mo.load(device="cpu", dtype=dtype) as m:
        calls = {"attn": 0, "norm": 0}
        for name, key in (("attn_block_decode", "attn"), ("rms_norm", "norm")):
            real = getattr(cpu_gemv, name)
            monkeypatch.setattr(cpu_gemv, name, lambda *a, _r=real, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1)
                                or _r(*a, **kw))
        moe = [0]
        count_moe_runs(monkeypatch, moe)
        with_glue = m.generate("In the beginning", max_new_tokens=12).token_ids
        assert all(calls.values()) and moe[0], (calls, moe)  # every piece ran
        monkeypatch.setattr(cpu_gemv, "glue_runs", lambda *a, **k: False)
        without = m.generate("In the beginning", max_new_tokens=12).token_ids
    assert with_glue == without


def test_the_glue_stays_out_of_autograd():
    x = torch.randn(1, 64, requires_grad=True)
    assert not cpu_gemv.glue_runs(x) and cpu_gemv.glue_runs(x.detach())
    with torch.no_grad():
        assert cpu_gemv.glue_runs(x)


def _decode_logits_with_and_without_glue(m, monkeypatch):
    from moe_offload.kernels import reference

    calls = [0]
    count_moe_runs(monkeypatch, calls)  # the compiled step runs experts_decode_a8 for resident packed experts
    ids = m.encode("In the beginning God created the heaven")
    with_glue = decode_steps(m, ids)
    assert calls[0] > 0  # the packed experts took the one-call path
    monkeypatch.setattr(reference, "_packed_glue", lambda *a: False)
    return with_glue, decode_steps(m, ids)


def decode_steps(m, ids, steps=6):
    """Logits of `steps` greedy decode steps after the prompt, [steps, V]."""
    from moe_offload.model.transformer import KVCache

    net = m.model
    cache = KVCache(net.cfg, 1, 64, net.dtype, net.device)
    out = []
    with torch.no_grad():
        logits = net(torch.tensor([ids]), 0, cache)[:, -1]
        pos = len(ids)
        for _ in range(steps):
            tok = logits.argmax(-1)
            logits = net(tok.view(1, 1), pos, cache)[:, -1]
            out.append(logits.float())
            pos += 1
    return torch.cat(out)


@pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="8-bit activation kernels need AVX512-VNNI")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_packed_experts_in_one_call_equal_the_pools_ffn_bit_for_bit(fmt, monkeypatch):
    # bf16 compute: int8 activations; the one call runs the same kernels with the same roundings between
    m = mo.load(config=mo.OffloadConfig.make(device="cpu", dtype="bfloat16", expert_dtype=fmt))
    with m:
        got, want = _decode_logits_with_and_without_glue(m, monkeypatch)
    assert torch.equal(got, want)


@pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="8-bit activation kernels need AVX512-VNNI")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])  # copied into RAM: Q4_0 as int4, K-quants repacked
def test_gguf_experts_in_one_call_equal_the_pools_ffn_bit_for_bit(qtype, tmp_path, monkeypatch):
    from test_gguf import write_wide_gguf

    f = write_wide_gguf(tmp_path / "w.gguf", hidden=256, inter=512, qtype=qtype)
    with mo.load(f, device="cpu", dtype="bfloat16") as m:
        got, want = _decode_logits_with_and_without_glue(m, monkeypatch)
    assert torch.equal(got, want)


@pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="8-bit activation kernels need AVX512-VNNI")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_raw_pool_keeps_its_own_ffn(fmt, monkeypatch):
    # a raw pool's ffn is dequantize-then-matmul with exact activations (the offloaded loop, the reference):
    # one token must not take the 8-bit one-call path, or it would differ from the same token among others
    from moe_offload.kernels import reference
    from test_quant_cpu import make_pool

    pool = make_pool(fmt, 128, 128, 256, 4)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 128, generator=g).bfloat16()
    ids, w = torch.tensor([[0, 2], [0, 2]]), torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    views = pool.as_views()
    one = reference.moe_loop(h[:1], ids[:1], w[:1], *views)
    assert torch.equal(one[0], reference.moe_loop(h, ids, w, *views)[0])
    monkeypatch.setattr(reference, "_packed_glue", lambda *a: False)
    assert torch.equal(one, reference.moe_loop(h[:1], ids[:1], w[:1], *views))


def test_rms_norm_of_a_row_does_not_depend_on_the_rows_beside_it():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 1000, generator=g).bfloat16()
    w = (torch.rand(1000, generator=g) + 0.5).bfloat16()
    from moe_offload.model.layers import rms_norm

    many = rms_norm(x, w, 1e-5)
    assert torch.equal(torch.cat([rms_norm(x[i:i + 1], w, 1e-5) for i in range(40)]), many)


def test_offloaded_float_experts_take_the_one_call_path_and_equal_resident(monkeypatch):
    calls = [0]
    real = cpu_gemv.experts_decode
    monkeypatch.setattr(cpu_gemv, "experts_decode", lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real(*a, **k))
    count_moe_runs(monkeypatch, calls)  # resident: the compiled step's experts_decode
    with mo.load(device="cpu", dtype="bfloat16", offload=False) as res:
        want = res.generate("In the beginning", max_new_tokens=8).token_ids
    resident_calls, calls[0] = calls[0], 0
    with mo.load(device="cpu", dtype="bfloat16", cache_per_layer=4) as m:  # slot rows of the cache's pool
        got = m.generate("In the beginning", max_new_tokens=8).token_ids
    assert resident_calls > 0 and calls[0] > 0
    assert got == want


def _step_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = cpu_gemv.attn_block_decode
    monkeypatch.setattr(cpu_gemv, "attn_block_decode", lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real(*a, **k))
    return calls


def _with_and_without_the_compiled_step(m, monkeypatch, ids=None, experts_too=True):
    from moe_offload.model.transformer import MoeModel

    calls, moe = _step_calls(monkeypatch), [0]
    count_moe_runs(monkeypatch, moe)
    ids = ids or m.encode("In the beginning God created the heaven")
    fused = decode_steps(m, ids)
    moe_layers = len(m.model.moe_layers)
    assert calls[0] == 6 * moe_layers, calls  # every MoE layer of every decode step took the compiled step
    assert moe[0] == (6 * moe_layers if experts_too else 0), moe  # and its router function and experts
    monkeypatch.setattr(MoeModel, "_steps", lambda *a: None)
    return fused, decode_steps(m, ids)


@pytest.mark.parametrize("dtype,dense,acts,experts", [
    ("float32", "auto", "auto", "auto"), ("bfloat16", "auto", "auto", "auto"), ("bfloat16", "int8", "auto", "auto"),
    ("bfloat16", "int8", "exact", "auto"), ("float32", "int8", "auto", "auto"), ("bfloat16", "auto", "auto", "int8"),
    ("bfloat16", "int8", "auto", "int4")])
def test_the_compiled_decode_step_equals_the_python_step_bit_for_bit(dtype, dense, acts, experts, monkeypatch):
    # attention, its projections and the router in one call, the router function and experts in another:
    # the same kernels and PyTorch ops in the same order, so the same bits (dense int8: the int8 rows
    # against 8-bit or exact activations; packed experts: the 8-bit one-call kernels)
    a8 = acts == "auto" and dtype == "bfloat16" and (dense == "int8" or experts != "auto")
    if a8 and not cpu_gemv.has_vnni():
        pytest.skip("8-bit activation kernels need AVX512-VNNI")
    cfg = mo.OffloadConfig.make(device="cpu", dtype=dtype, dense_dtype=dense, cpu_activations=acts,
                                expert_dtype=experts)
    with mo.load(config=cfg) as m:
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch)
    assert torch.equal(fused, python)


@pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="8-bit activation kernels need AVX512-VNNI")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])  # copied into RAM: Q4_0 as int4, K-quants repacked
def test_the_compiled_step_runs_gguf_experts_as_the_python_step(qtype, tmp_path, monkeypatch):
    from test_gguf import write_wide_gguf

    f = write_wide_gguf(tmp_path / "w.gguf", hidden=256, inter=512, qtype=qtype)
    with mo.load(f, device="cpu", dtype="bfloat16") as m:
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch)
    assert torch.equal(fused, python)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_step_runs_biases_sinks_and_windows_as_the_python_step(dtype, tmp_path, monkeypatch):
    # GPT-OSS: q/k/v and o biases, a router bias, attention sinks, every other layer a sliding window
    # shorter than the prompt, float32 norms under bfloat16
    from test_gpt_oss import build

    build(tmp_path / "gpt_oss")
    with mo.load(tmp_path / "gpt_oss", device="cpu", dtype=dtype) as m:
        # its experts have biases and their own activation: the Python step runs them
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch, ids=list(range(3, 15)), experts_too=False)
    assert torch.equal(fused, python)


def test_a_weight_changed_after_decoding_is_planned_again(monkeypatch):
    from moe_offload.model.layers import store_int8_rows

    with mo.load(device="cpu", dtype="bfloat16") as m:
        ids = m.encode("In the beginning")
        decode_steps(m, ids, steps=2)  # planned on the bf16 o_proj
        w = m.model.layers[1].o_proj
        s = w.float().abs().amax(1).clamp_min(1e-8) / 127  # [N]
        store_int8_rows(w, (w.float() / s[:, None]).round().to(torch.int8), s.half())
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch, ids)
    assert torch.equal(fused, python)


@pytest.mark.skipif(not cpu_gemv.has_vnni(), reason="8-bit activation kernels need AVX512-VNNI")
def test_experts_swapped_after_decoding_are_planned_again(monkeypatch):
    # the reference backend (dequantize-then-matmul) has no one-call experts: a stale plan would still
    # run the packed 8-bit kernels and differ from the Python step
    with mo.load(config=mo.OffloadConfig.make(device="cpu", dtype="bfloat16", expert_dtype="int8")) as m:
        ids = m.encode("In the beginning")
        decode_steps(m, ids, steps=2)
        m.model.experts = m.model.experts.reference()
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch, ids, experts_too=False)
    assert torch.equal(fused, python)


def test_a_model_copies_after_decoding():
    import copy

    with mo.load(device="cpu", dtype="float32") as m:
        ids = m.encode("In the beginning")
        before = decode_steps(m, ids, steps=2)
        twin = copy.deepcopy(m.model)
        assert twin._decode_plan is None and m.model._decode_plan is not None
        m.model, kept = twin, m.model
        assert torch.equal(decode_steps(m, ids, steps=2), before)
        m.model = kept


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_step_runs_qwen_layers_as_the_python_step(family, dtype, tmp_path, monkeypatch):
    # Qwen3: per-head q / k RMSNorm; Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, weights
    # not renormalized
    from test_families import build_hf

    build_hf(tmp_path / family, family)
    with mo.load(tmp_path / family, device="cpu", dtype=dtype) as m:
        fused, python = _with_and_without_the_compiled_step(m, monkeypatch, ids=list(range(3, 15)))
    assert torch.equal(fused, python)
