"""Triton fused_moe over GGUF rows: Q8_0, Q4_0, Q4_K, Q6_K and MXFP4 blocks decoded in registers
(TRITON_INTERPRET=1 on CPU). Oracle: gguf.quants.dequantize (llama.cpp's Python reference) of the very
blocks in the pool, then a plain float32 MoE in torch; the pool's own dequantization (what the loop
backend runs) is checked bit-equal to it on the way. End to end: a tiny GGUF file run with
moe_backend 'triton' equals 'loop'."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import moe_offload as mo  # noqa: E402
from moe_offload.errors import MoeOffloadError  # noqa: E402
from moe_offload.formats import choose_format, get_format  # noqa: E402
from moe_offload.formats.gguf import BLOCK_TYPES, GgufFormat  # noqa: E402
from moe_offload.kernels import TileConfig, fused_moe_quant, run_experts  # noqa: E402
from moe_offload.kernels.fused_moe import _weight_tile  # noqa: E402
from moe_offload.kernels.pool import GGUF_FLAGS  # noqa: E402
from moe_offload.options import OffloadConfig  # noqa: E402
from test_gguf import PROMPT, random_blocks, tiny_mixtral, write_gguf  # noqa: E402
from test_kernels_quant import TOL, rel_err  # noqa: E402

TRITON_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "MXFP4")
LOOP_ONLY_TYPES = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K")
QUANTIZABLE = ("Q8_0", "Q4_0", "MXFP4")  # gguf.quants writes these; K types get random valid blocks
FAST = TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1)


def tile(block_k: int) -> TileConfig:
    return TileConfig(block_m=16, block_n=64, block_k=block_k, num_warps=4, num_stages=1)


def dims(types) -> tuple[int, int]:
    """(hidden, inter): whole super-blocks for K types, else odd multiples of 32 (a partial last tile)."""
    return (256, 256) if any(BLOCK_TYPES[t].block == 256 for t in types) else (96, 160)


def file_blocks(rng, qtype: str, rows: int, k: int) -> np.ndarray:
    """uint8 [rows, row bytes] as a GGUF file holds them: gguf.quants of random weights, or random
    K-quant blocks with small fp16 scales (weights ~ 1/sqrt(k))."""
    if qtype in QUANTIZABLE:
        w = (rng.standard_normal((rows, k)) / k ** 0.5).astype(np.float32)
        return np.ascontiguousarray(quantize(w, T[qtype]))
    return random_blocks(rng, qtype, rows, k, scale=3e-4)


@dataclass
class Case:
    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    pool: object  # GgufPool over slot rows
    slot_of: torch.Tensor  # [E]
    w13: list  # per expert, float32 [2I, H] from gguf.quants
    w2: list  # per expert, float32 [H, I]


def make_gguf_case(types, t: int, e: int, k: int, seed: int = 0, ids=None, dtype=torch.float32,
                   extra_slots: int = 2, dims_=None) -> Case:
    """e random experts of (gate, up, down) `types` in random slots of a slot-row pool whose unused slots
    are 0xFF garbage (NaN scales)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    h, i = dims_ or dims(types)
    fmt = GgufFormat(tuple(types))
    s = e + extra_slots
    rows = torch.full((s, fmt.expert_bytes(h, i)), 0xFF, dtype=torch.uint8)
    views = fmt.views(rows, h, i)
    slot_of = torch.randperm(s, generator=g)[:e].to(torch.int32)
    w13, w2 = [], []
    for x in range(e):
        deq = {}
        for sec, qt, (n, kk) in (("w1", types[0], (i, h)), ("w3", types[1], (i, h)), ("w2", types[2], (h, i))):
            b = file_blocks(rng, qt, n, kk)
            views[sec][slot_of[x]].copy_(torch.from_numpy(b))
            deq[sec] = torch.from_numpy(np.array(dequantize(b, T[qt]), dtype=np.float32))
        w13.append(torch.cat([deq["w1"], deq["w3"]]))
        w2.append(deq["w2"])
    pool = fmt.pool_views(rows, h, i)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, k] distinct
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    return Case(hidden, ids, weights, pool, slot_of, w13, w2)


def oracle(c: Case) -> torch.Tensor:
    """sum_j w[t, j] * SwiGLU expert ids[t, j] on gguf.quants' weights, float32, token by token."""
    x = c.hidden.float()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(c.ids.shape[1]):
            e = int(c.ids[t, j])
            gate, up = (c.w13[e] @ x[t]).chunk(2)
            out[t] += c.weights[t, j] * (c.w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def check(c: Case, config: TileConfig = FAST, dtype=torch.float32) -> None:
    """The kernel's output, written in full, equals the oracle within the dtype's tolerance; the pool's
    torch dequantization of the first expert equals gguf.quants bit for bit."""
    slot = int(c.slot_of[0])
    w13, w2 = c.pool.dequant(slot, torch.float32)
    assert torch.equal(w13.view(torch.int32), c.w13[0].view(torch.int32))
    assert torch.equal(w2.view(torch.int32), c.w2[0].view(torch.int32))
    out = torch.full_like(c.hidden, float("nan"))
    got = fused_moe_quant(c.hidden, c.ids, c.weights, c.pool, c.slot_of, out=out, config=config, debug=True)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "output not fully written"
    err = rel_err(out, oracle(c))
    assert err < TOL[dtype], err


# --- the decoders alone: every weight bit for bit --------------------------------------------------------------
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208], "MXFP4": []}


def any_blocks(rng, qtype: str, rows: int, k: int) -> np.ndarray:
    """uint8 [rows, row bytes] of random bytes, fp16 fields any finite value (subnormals included); an
    MXFP4 exponent byte takes all 256 values (e < 2: ggml's subnormal halves)."""
    bt = BLOCK_TYPES[qtype]
    raw = rng.integers(0, 256, size=(rows * (k // bt.block), bt.nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        bits = rng.integers(0, 0x7C00, size=raw.shape[0], dtype=np.uint16) | (rng.integers(0, 2, raw.shape[0]) << 15).astype(np.uint16)
        raw[:, off:off + 2] = bits.view(np.uint8).reshape(-1, 2)
    if qtype == "MXFP4":
        raw[:256, 0] = np.arange(256, dtype=np.uint8)
    return raw.reshape(rows, -1)


@triton.jit
def _decode_kernel(q_ptr, out_ptr, n_rows, k_len, stride_q, WEIGHT_FORMAT: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """out[n, k] = the fused kernel's weight tile of rows q [N, row bytes], float32."""
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = (kk < k_len)[:, None] & (cols < n_rows)[None, :]
    w = _weight_tile(q_ptr, q_ptr, q_ptr, kk, cols, mask, stride_q, 1, 0, 0, WEIGHT_FORMAT, 1)  # [BK, BN]
    tl.store(out_ptr + cols[None, :] * k_len + kk[:, None], w, mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")
@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_decoded_tiles_equal_gguf_quants_bit_for_bit(qtype):
    """Every weight the kernel decodes from random blocks (any scale bytes) is gguf.quants' float32, bit for
    bit (the interpreter has no fused multiply-add; a GPU may round a Q4_K weight's d*q - m once less)."""
    rng = np.random.default_rng(8)
    n, k = 16, 2 * BLOCK_TYPES[qtype].block * (1 if qtype in ("Q4_K", "Q6_K") else 8)
    q = any_blocks(rng, qtype, n, k)
    want = np.array(dequantize(q, T[qtype]), dtype=np.float32)
    out = torch.full((n, k), float("nan"))
    _decode_kernel[(triton.cdiv(k, 64), triton.cdiv(n, 16))](torch.from_numpy(q), out, n, k, q.shape[1],
                                                             WEIGHT_FORMAT=GGUF_FLAGS[qtype], BLOCK_K=64, BLOCK_N=16)
    assert not np.isnan(want).any()  # MXFP4's largest exponents overflow to inf, in both
    assert np.array_equal(out.numpy().view(np.uint32), want.view(np.uint32))


# --- the five types against gguf.quants -------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_tokens_over_several_experts_match_gguf_quants(qtype):
    check(make_gguf_case((qtype,) * 3, t=5, e=4, k=2, seed=1))


@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_all_tokens_on_one_expert(qtype):
    t = 19
    check(make_gguf_case((qtype,) * 3, t=t, e=3, k=1, seed=2, ids=torch.full((t, 1), 2)))


@pytest.mark.parametrize("where", ["smaller", "larger"])
@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_block_k_smaller_and_larger_than_a_block(qtype, where):
    """A tile of BLOCK_K weights inside one block, or spanning several (32-weight blocks: 16 / 128; K-quant
    super-blocks of 256: 32 / 512, hidden = inter = 512). BLOCK_K 16 runs only here: the GPU wants >= 32."""
    big = BLOCK_TYPES[qtype].block == 256
    block_k = {(False, "smaller"): 16, (False, "larger"): 128, (True, "smaller"): 32, (True, "larger"): 512}[big, where]
    shape = (512, 512) if big and where == "larger" else None
    c = make_gguf_case((qtype,) * 3, t=3, e=2, k=2, seed=3, extra_slots=1, dims_=shape)
    check(c, tile(block_k))


def test_q4_k_m_mix_gate_up_q4_k_down_q6_k():
    """llama.cpp's Q4_K_M layers: gate / up Q4_K, down Q6_K: GEMM1 and GEMM2 compile different variants."""
    c = make_gguf_case(("Q4_K", "Q4_K", "Q6_K"), t=6, e=4, k=2, seed=4)
    assert (c.pool.kernel_format("w13"), c.pool.kernel_format("w2")) == (5, 6)
    check(c)


@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_fp16_activations(qtype):
    c = make_gguf_case((qtype,) * 3, t=4, e=3, k=2, seed=5, dtype=torch.float16)
    check(c, dtype=torch.float16)


def test_top8_of_many_experts_q8_0():
    check(make_gguf_case(("Q8_0",) * 3, t=2, e=32, k=8, seed=6, extra_slots=0))


def test_gate_up_one_view_of_slot_rows_and_a_copy_of_separate_tensors():
    """Slot rows hold up right after gate: the kernel reads a [S, 2I, rb] view of them, no copy. A pool over
    a file's separate gate / up tensors (the CPU's resident memory map) is read through a copy: same result."""
    c = make_gguf_case(("Q4_0",) * 3, t=4, e=3, k=2, seed=7, extra_slots=0)
    p = c.pool
    w13, _, _ = p.kernel_views("w13")
    s, i, rb = p.w13.shape
    assert w13.shape == (s, 2 * i, rb) and w13.data_ptr() == p.w13.data_ptr()
    assert torch.equal(w13[:, i:], p.w3)
    fmt = GgufFormat(("Q4_0",) * 3)
    apart = fmt.tensor_pool(p.w13.clone(), p.w3.clone(), p.w2.clone(), p.hidden, p.inter)
    assert apart.kernel_views("w13")[0].data_ptr() != apart.w13.data_ptr()
    check(Case(c.hidden, c.ids, c.weights, apart, c.slot_of, c.w13, c.w2))


# --- refusals: one line naming the projection and its type, and the types triton runs -----------------------
def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("qtype", LOOP_ONLY_TYPES)
def test_triton_refuses_the_other_types_in_one_line(qtype):
    for types, proj in (((qtype,) * 3, "gate"), (("Q4_K", "Q4_K", qtype), "down")):
        name = "gguf:" + (qtype if proj == "gate" else ",".join(types))
        assert choose_format(name, 128, torch.float32, "loop").name == name
        with pytest.raises(MoeOffloadError) as e:
            choose_format(name, 128, torch.float32, "triton")
        msg = _one_line(e)
        assert f"the {proj} projection is {qtype}" in msg and "Q8_0, Q4_0, Q4_K, Q6_K, MXFP4" in msg
        assert "moe_backend='loop'" in msg


def test_triton_refuses_gate_and_up_of_different_types():
    with pytest.raises(MoeOffloadError) as e:
        choose_format("gguf:Q4_K,Q6_K,Q6_K", 128, torch.float32, "triton")
    assert "gate is Q4_K and up is Q6_K" in _one_line(e)


def test_layers_of_different_types_each_their_own_flag_or_the_layer_named():
    fmt = choose_format("gguf:Q4_K*2;Q4_K,Q4_K,Q6_K", 128, torch.float32, "triton")
    assert fmt.moe_backends == ("loop", "triton")
    with pytest.raises(MoeOffloadError) as e:
        choose_format("gguf:Q4_K*2;Q5_K,Q5_K,Q6_K", 128, torch.float32, "triton")
    assert "GGUF experts of layer 2: the gate projection is Q5_K" in _one_line(e)


def test_triton_accepts_the_five_and_grouped_mm_refuses_gguf():
    for qtype in TRITON_TYPES:
        assert choose_format(f"gguf:{qtype}", 128, torch.float32, "triton").moe_backends == ("loop", "triton")
    with pytest.raises(MoeOffloadError) as e:
        choose_format("gguf:Q8_0", 128, torch.float32, "grouped_mm")
    assert "run on moe_backend 'loop' or 'triton'; got moe_backend 'grouped_mm'" in _one_line(e)


def test_the_kernel_itself_refuses_a_pool_it_cannot_read():
    h, i = 256, 256
    fmt = get_format("gguf:Q4_K,Q4_K,Q5_K")
    pool = fmt.pool_views(torch.zeros(2, fmt.expert_bytes(h, i), dtype=torch.uint8), h, i)
    x, ids, w = torch.randn(1, h), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    slots = torch.arange(2, dtype=torch.int32)
    for call in (lambda: fused_moe_quant(x, ids, w, pool, slots), lambda: run_experts("triton", x, ids, w, pool, None, slots)):
        with pytest.raises(ValueError, match="the down projection is Q5_K; moe_backend 'triton' runs"):
            call()


# --- end to end: a tiny GGUF file, triton == loop ------------------------------------------------------------
E2E = {"q4_k_m_layers": [("Q4_K",) * 3, ("Q4_K", "Q4_K", "Q6_K")], "q8_0_q4_0": ("Q8_0", "Q8_0", "Q4_0"),
       "mxfp4": ("MXFP4",) * 3}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of a very negative gate: 0
@pytest.mark.parametrize("name", list(E2E))
def test_tiny_gguf_model_triton_equals_loop(name, tmp_path):
    """Logits of moe_backend 'triton' equal 'loop' (fp32): resident (the file's memory map) and offloaded
    (slot rows shared by layers of different row sizes)."""
    types = E2E[name]
    hf = tiny_mixtral(256, 256) if name.startswith("q4_k") else tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=types)
    runs = {"loop": dict(moe_backend="loop", offload=False), "triton": dict(moe_backend="triton", offload=False)}
    if name.startswith("q4_k"):
        runs["triton_offloaded"] = dict(moe_backend="triton", cache_per_layer=2)
    logits = {}
    for run, kw in runs.items():
        with mo.load(f, OffloadConfig.make(device="cpu", dtype="float32", **kw)) as m:
            assert m.runtime.moe_backend == kw["moe_backend"]
            logits[run] = m.logits(PROMPT)
    for run in runs:
        assert rel_err(logits[run], logits["loop"]) < 1e-4, run


def test_gpu_check_flags_gguf_rows_over_tolerance_or_not_finite():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = {"shape": "mixtral", "fmt": "Q4_K,Q4_K,Q6_K", "tokens": 4, "max_rel_diff": 1e-3, "finite": True}
    assert not mod.section_failures("gguf_kernels", {"rows": [row]})
    assert mod.section_failures("gguf_kernels", {"rows": [dict(row, max_rel_diff=0.5)]})
    assert mod.section_failures("gguf_kernels", {"rows": [dict(row, max_rel_diff=float("nan"))]})
    assert mod.section_failures("gguf_kernels", {"rows": [dict(row, finite=False)]})


COMPILE_SM90 = r'''
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
fm = importlib.import_module("moe_offload.kernels.fused_moe")
consts = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "UPCAST": False, "GROUP": 1}
for flag in map(int, sys.argv[1:]):
    for kern in (fm._gemm1_silu_kernel, fm._gemm2_weighted_kernel):
        c = dict(consts, WEIGHT_FORMAT=flag)
        sig = {n: "constexpr" if n in c else "*bf16" if n in ("x_ptr", "act_ptr", "y_ptr") else "*fp32"
               if n == "weights_ptr" else "*u8" if n in ("w_ptr", "s_ptr", "z_ptr") else "*i32"
               if n.endswith("_ptr") else "i64" if n == "stride_ws" else "i32" for n in kern.arg_names}
        src = ASTSource(fn=kern, signature=sig, constexprs={(kern.arg_names.index(n),): v for n, v in c.items()})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        assert out.asm["cubin"], (flag, kern)
print("compiled", sys.argv[1:])
'''


def test_gguf_variants_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code the GPU compiler rejects: every GGUF variant of both kernels (bf16
    activations) goes through Triton's real pipeline to an sm_90 cubin (ptxas ships with triton)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", COMPILE_SM90, *map(str, GGUF_FLAGS.values())], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
