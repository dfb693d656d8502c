"""Weight-streaming CPU kernels for decode (csrc/cpu_gemv.cpp): y [M, N] = x [M, K] @ W [N, K]^T for
float32 / bfloat16 weights, moe_offload's int8 and int4 layouts and GGUF Q8_0 / Q4_0 rows, read in place.

Decode reads each weight byte once per token, so its speed is memory bandwidth. For quantized weights
PyTorch offers dequantize-then-matmul (0.50 vs 5.80 ms for one row of int8 at Mixtral-734M's 7168 x
1024 projection) or weight-only ops that need repacked copies; for bf16 its one-row matmul is closer
(0.77 vs 0.98 ms). 2 threads on the 2-core reference machine, quiet (benchmarks/results/
cpu_vs_llamacpp.json, "crossover"). These kernels widen each weight to float32 in registers and read every row once for all M
rows of x, reading the packed layouts in place.

The extension is compiled on first use with the machine's compiler (torch.utils.cpp_extension,
`-O3 -march=native -fopenmp`: ATen's parallel_for splits the output rows over torch's OpenMP threads
only when the extension is compiled with OpenMP; ~30-60 s once, then cached under torch's extension
folder). Where it cannot be
built (no C++ compiler, no ninja), where the CPU has no AVX-512 (the scalar fallback loops would be
slower than PyTorch), or where MOE_OFFLOAD_CPU_KERNELS=0 is set, `available()` is False, a one-line
warning says why once, and callers use PyTorch's ops (exact to the same tolerance, slower).

8-bit activations (`set_activations`): against quantized weights (int8, int4, GGUF Q8_0 / Q4_0 / Q4_K /
Q6_K / MXFP4, GPT-OSS's MXFP4) the kernels can round x per block of 32 to int8 (d = max|x| / 127, llama.cpp's
q8_0 activations) and multiply bytes with AVX512-VNNI, exact in integers: y = W x' with x' the rounded
activations. The rounding costs about 0.4% of a block's largest value per element, one bfloat16
rounding's worth; int8 and int4 calls on several rows of x run 1.5-2x faster (one row is memory-bound
either way; int4 decode of the 734M model 1.27x). 'auto' uses it when x is bfloat16 or float16 and keeps
float32 exact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_gemv.cpp"
_NAME = "moe_offload_cpu_gemv"
_ext: Any = None
_why_not: str | None = None
_features = {"vnni": False, "bf16": False}  # what the built extension has, read once when it loads
# Most rows of x for which these kernels (each weight row read once, then one dot per row of x) beat the
# alternative, at Mixtral-734M's 7168 x 1024 projection on the 2-core reference machine, 2 threads, quiet
# (`python benchmarks/cpu_vs_llamacpp.py --crossover`; a full run records it, "crossover"): bf16 weights
# against PyTorch's GEMM, 1.04 vs 1.07 ms at 4 rows, 1.40 vs 1.13 at 8; int8 (int8 activations) against
# dequantize-to-bf16-then-matmul, 1.20 vs 1.70 ms at 8 rows, 1.85 vs 1.76 at 16; int4 group 32 (its
# 128-weight steps), 1.36 vs 1.94 ms at 16 rows, 3.00 vs 2.13 at 32.
MAX_ROWS = 4
QUANT_MAX_ROWS = 8
INT4_MAX_ROWS = 16
ACTIVATIONS = ("auto", "int8", "exact")  # set_activations's modes
_activations = "auto"


def _load() -> Any:
    global _ext, _why_not
    if _ext is not None or _why_not is not None:
        return _ext
    if os.environ.get("MOE_OFFLOAD_CPU_KERNELS", "1") == "0":
        _why_not = "MOE_OFFLOAD_CPU_KERNELS=0"
        return None
    _find_ninja()
    try:
        from torch.utils import cpp_extension

        # torch rebuilds when the source, its path or the flags change; a marker per (source, path, torch)
        # says whether this one was built before, so the notice shows only when a build is coming
        key = hashlib.sha256(_SOURCE.read_bytes() + str(_SOURCE).encode() + torch.__version__.encode()).hexdigest()
        marker = Path(cpp_extension._get_build_directory(_NAME, verbose=False)) / f"built-{key[:16]}"
        if not marker.exists():
            print("moe-offload: building the CPU decode kernels (once, ~30-60 s) ...", file=sys.stderr, flush=True)
        _ext = cpp_extension.load(name=_NAME, sources=[str(_SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        marker.touch()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use PyTorch's ops, and say so
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        _why_not = f"the CPU decode kernels could not be built ({first})"
        warnings.warn(f"moe-offload: {_why_not}; decode uses PyTorch's slower matmul instead", stacklevel=3)
        return None
    _features.update(vnni=bool(_ext.has_vnni()), bf16=bool(_ext.has_avx512_bf16()))  # asked once, not per call
    if not _ext.has_avx512():  # the portable scalar loops are slower than PyTorch's ops: do not use them
        _ext = None
        _why_not = "this CPU has no AVX-512 (the CPU decode kernels' vector paths need it)"
        warnings.warn(f"moe-offload: {_why_not}; decode uses PyTorch's matmul", stacklevel=3)
    return _ext


def _find_ninja() -> None:
    """torch builds with the `ninja` on PATH; a venv's (the pip package, a dependency) is not on it unless
    the venv is activated: put its folder there."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """Whether the compiled kernels can run (building them on the first call)."""
    return _load() is not None


def why_unavailable() -> str | None:
    """Why the kernels are not used (None when they are, or before the first `available()`)."""
    return _why_not


def has_vnni() -> bool:
    """Whether the 8-bit activation paths (AVX512-VNNI) are built (building the kernels on first call)."""
    return available() and _features["vnni"]


def set_activations(mode: str) -> None:
    """What quantized weights multiply against: 'int8' activations rounded per block of 32 (needs
    has_vnni()), 'exact' x as given (widened to float32), or 'auto' (int8 when x is bfloat16 / float16).
    Process-wide, as torch.set_num_threads; moe_offload.load sets it from OffloadConfig.cpu_activations."""
    global _activations
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations mode must be one of {ACTIVATIONS}, got {mode!r}")
    if mode == "int8" and not has_vnni():
        raise RuntimeError("int8 activations need the CPU decode kernels with AVX512-VNNI: "
                           f"{why_unavailable() or 'this CPU has no AVX512-VNNI'}")
    _activations = mode


def activations() -> str:
    """The mode set_activations last set."""
    return _activations


def int8_activations(x: torch.Tensor, k: int) -> bool:
    """Whether a quantized-weight kernel call on x [..., K = k] rounds x to int8 (the mode, K a multiple
    of 64, VNNI built)."""
    if _activations == "exact" or k % 64:
        return False
    if _activations == "auto" and x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return has_vnni()


def _require() -> Any:
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the CPU decode kernels are not available: {_why_not}")
    return ext


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).float().contiguous(), lead


def _a8(run: Any, x: torch.Tensor, n: int, *args: Any) -> torch.Tensor:
    """An 8-bit activation kernel on x [..., K] -> [..., n] in x's dtype: float32 and bfloat16 x go in and
    come out as they are (the kernel converts), others through float32."""
    x2 = x.reshape(-1, x.shape[-1])
    y = run(x2.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x2.float().contiguous(), *args)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _pair_dots(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and _features["bf16"]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T -> [..., N] in x's dtype; w float32 or bfloat16, contiguous, on cpu."""
    ext = _require()
    if _pair_dots(x, w):  # bf16 pair dots
        return ext.gemv_bf16(x.reshape(-1, x.shape[-1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    x2, lead = _rows(x)
    return ext.gemv_float(x2, w).to(x.dtype).view(*lead, w.shape[0])


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q * s[:, None])^T -> [..., N]; q int8 [N, K], s fp16 [N]."""
    ext = _require()
    if int8_activations(x, q.shape[1]):
        return _a8(ext.gemv_int8_a8, x, q.shape[0], q, s)
    x2, lead = _rows(x)
    return ext.gemv_int8(x2, q, s).to(x.dtype).view(*lead, q.shape[0])


def int4_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int,
                symmetric: bool = False) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with W = (q - z) * s per group of `group_size` along K; q uint8
    [N, K/2] (even k in the low nibble), s / z fp16 [N, K/G]; `symmetric`: every z is 8 (then not read)."""
    ext = _require()
    if int8_activations(x, 2 * q.shape[1]) and (group_size % 64 == 0 or group_size in (8, 16, 32)):
        return _a8(ext.gemv_int4_a8, x, q.shape[0], q, s, z, group_size, symmetric)
    x2, lead = _rows(x)
    return ext.gemv_int4(x2, q, s, z, group_size).to(x.dtype).view(*lead, q.shape[0])


def dequant_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q uint8 [N, K/2], s / z fp16 [N, K/G] -> [N, K] = (q - z) * s in float32 (or bfloat16 when dtype
    is), bit-equal to the torch reference (formats.int4.dequant_int4), then cast."""
    return _require().dequant_int4(q, s, z, group_size, dtype == torch.bfloat16)


def dequant_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [N, K], s fp16 [N] -> [N, K] = q * s in float32 (or bfloat16 when dtype is), bit-equal to
    the torch reference (formats.int8.dequant_int8), then cast."""
    return _require().dequant_int8(q, s, dtype == torch.bfloat16)


GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "MXFP4": 17, "Q4_K": 144, "Q6_K": 210}  # the GGUF types the kernels read
GGUF_EXACT = ("Q8_0", "Q4_0")  # ... of which these also against exact activations


def gguf_runs(block_type: str, x: torch.Tensor, k: int) -> bool:
    """Whether gguf_linear takes rows of `block_type` for x [..., K = k] (the activations mode decides)."""
    if block_type not in GGUF_BLOCK_BYTES or not available():
        return False
    return int8_activations(x, k) or block_type in GGUF_EXACT


def gguf_linear(x: torch.Tensor, q: torch.Tensor | list[torch.Tensor], block_type: str) -> torch.Tensor:
    """x [..., K] @ dequant(q)^T -> [..., N]; q uint8 [N, row bytes], GGUF rows of `block_type` as the
    file stores them (Q8_0, Q4_0; MXFP4, Q4_K and Q6_K with int8 activations: see gguf_runs), or a list
    of such matrices (gate and up) whose outputs are concatenated, x read (and rounded) once."""
    ext = _require()
    bb = GGUF_BLOCK_BYTES[block_type]
    qs = q if isinstance(q, list) else [q]
    n = sum(t.shape[0] for t in qs)
    if int8_activations(x, x.shape[-1]):
        return _a8(ext.gemv_gguf_a8, x, n, qs, bb)
    x2, lead = _rows(x)
    return torch.cat([ext.gemv_gguf(x2, t, bb) for t in qs], dim=-1).to(x.dtype).view(*lead, n)


def q4k_linear(x: torch.Tensor, q: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] against 8-bit activations (int8_activations(x, K) must hold), W GGUF Q4_K
    rows repacked (formats.gguf.Q4kRows): q uint8 [N, K/2] (int4 layout), sc / mn uint8 [N, K/32], dd
    fp16 [N, K/256, 2]; w = d * sc * q - dmin * mn."""
    return _a8(_require().gemv_q4k_a8, x, q.shape[0], q, sc, mn, dd)


def q6k_linear(x: torch.Tensor, ql: torch.Tensor, qh: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] against 8-bit activations (int8_activations(x, K) must hold), W GGUF Q6_K
    rows repacked (formats.gguf.Q6kRows): ql uint8 [N, K/2], qh uint8 [N, K/4], sc int8 [N, K/16], d fp16
    [N, K/256]; w = d * sc * (q - 32)."""
    return _a8(_require().gemv_q6k_a8, x, ql.shape[0], ql, qh, sc, d)


def mxfp4_runs(x: torch.Tensor, k: int) -> bool:
    """Whether mxfp4_linear runs for x [..., K = k] (int8 activations only)."""
    return available() and int8_activations(x, k)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] for W in GPT-OSS's MXFP4 layout: blocks uint8 [N, K/32, 16] (element 2j
    of a block the low nibble of byte j), scales uint8 [N, K/32] (e8m0); int8 activations (mxfp4_runs)."""
    return _a8(_require().gemv_mxfp4_a8, x, blocks.shape[0], blocks, scales)


# The decode-step glue (rms_norm, attn_decode, experts_decode): one call each for what a one-token step
# does between its weight products, instead of a dozen PyTorch ops from Python each (bf16 decode of the
# 734M model: 4.2 of 32 ms per token outside the weight products before them; see the benchmark).
GLUE_DTYPES = (torch.float32, torch.bfloat16)


def glue_runs(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the decode-step glue takes x (and weights): cpu, float32 / bfloat16, nothing that needs
    gradients, the kernels built."""
    if x.device.type != "cpu" or x.dtype not in GLUE_DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return available()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] times w [H] (x's dtype, or float32), rounded as layers.rms_norm rounds it."""
    return _require().rms_norm(x.contiguous(), w.contiguous(), eps)


def attn_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, pos: int, heads: int, kv_heads: int, rotary_dim: int, window: int | None,
                scale: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """One token's attention: qkv [.., (heads + 2 kv_heads) * hd] (its q/k/v projection, q and k normed),
    cos / sin [hd] its RoPE rows; rotates q and k (rotate-half, the leading rotary_dim dims), writes k and v
    into k_cache / v_cache [kv_heads, S, hd] at pos, attends over keys 0..pos (the last `window` of them
    with a sliding window; a sink logit per head, sinks [heads] float32, where given) -> [1, heads * hd].
    All in qkv's dtype (float32 or bfloat16)."""
    no_sinks = _EMPTY if sinks is None else sinks.float().contiguous()
    return _require().attn_decode(qkv.reshape(-1).contiguous(), cos, sin, k_cache, v_cache, pos, heads, kv_heads,
                                  rotary_dim, window or 0, scale, no_sinks)


_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class StepProjection:
    """One projection of the compiled decode step (attn_plan), run exactly as model.layers.linear
    runs one row: kind 0 bfloat16 pair dots (w), 1 float32 sums (w float32 or bfloat16), 2 int8 rows (q, s)
    against 8-bit activations, 3 int8 rows against float32 activations; then `+ bias` unless it is empty."""

    kind: int
    tensors: tuple[torch.Tensor, ...]
    bias: torch.Tensor = _EMPTY


def step_float(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> StepProjection | None:
    """How linear (+ bias) runs one row x [1, K] against float weights w, or None where it would not run
    here (use_for)."""
    if not use_for(x, w):
        return None
    return StepProjection(0 if _pair_dots(x, w) else 1, (w,), _EMPTY if bias is None else bias)


def step_int8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> StepProjection:
    """How int8_linear (+ bias) runs one row x [1, K] against int8 rows q [N, K], fp16 scales s [N]."""
    return StepProjection(2 if int8_activations(x, q.shape[1]) else 3, (q, s), _EMPTY if bias is None else bias)


def attn_plan(ln1: torch.Tensor, ln2: torch.Tensor, eps: float,
              projections: tuple[StepProjection, StepProjection, StepProjection], heads: int, kv_heads: int,
              rotary_dim: int, window: int | None, scale: float, sinks: torch.Tensor | None,
              q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None) -> Any:
    """The attention half of one layer's decode step and its router, planned once (attn_block_decode runs
    it): x [1, H] the residual -> [x + o_proj(attention(qkv_proj(RMSNorm(x) * ln1))), h = RMSNorm(that) *
    ln2, router logits of h], the same ops as the Python step (rms_norm, layers.linear, attn_decode) in the
    same order. projections: qkv, o, router; sinks [heads] or None (read as float32 at each call);
    q_norm / k_norm [hd]: each q and k head RMS-normed after the projection (Qwen3's per-head norm)."""
    return _require().AttnDecode(ln1, ln2, eps, [p.kind for p in projections], [list(p.tensors) for p in projections],
                                 [p.bias for p in projections], heads, kv_heads, rotary_dim, window or 0, scale,
                                 _EMPTY if sinks is None else sinks, _EMPTY if q_norm is None else q_norm,
                                 _EMPTY if k_norm is None else k_norm)


def attn_block_decode(plan: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, layer: int, pos: int) -> list[torch.Tensor]:
    """Run an attn_plan for one token x [1, H] at position pos: cos / sin the RoPE tables [S, >= rotary_dim],
    the caches [L, B, kv_heads, S, hd] (layer `layer`, row 0 written at pos) -> [x2, h, logits]."""
    return plan.run(x, cos, sin, k_cache, v_cache, layer, pos)


def moe_decode(scoring: str, renormalize: bool, scale: float, top_k: int, packed: bool, entries: list) -> Any:
    """A MoE layer's router function and experts for one decode token, planned once: `.run(h [1, H],
    logits [1, E])` -> [out [1, H], ids [1, k] int64, weights [1, k] float32]. scoring 'softmax' (then
    top-k, renormalized if asked) or 'topk_softmax', then times scale: families.Routing's ops. entries:
    kernels.one_token_experts' list (packed: two A8Projection per expert; float: (w13, w2) per expert)."""
    ext = _require()
    code = ("softmax", "topk_softmax").index(scoring)
    if packed:
        return ext.MoeDecode(code, renormalize, scale, top_k, True, [p.kind for p in entries],
                             [list(p.tensors) for p in entries], [p.a for p in entries], [p.b for p in entries])
    return ext.MoeDecode(code, renormalize, scale, top_k, False, [], [[a, b] for a, b in entries], [], [])


def experts_decode(x: torch.Tensor, w13: list[torch.Tensor], w2: list[torch.Tensor], weights: torch.Tensor,
                   cols: list[int], out: torch.Tensor) -> None:
    """out [1, H] += sum_j weights[cols[j]] * W2_j (silu(gate) * up), [gate | up] = W13_j x, for one token x
    [1, H] and float experts w13 [2I, H], w2 [H, I] in x's dtype, in the order given; weights float32 [k]
    (read in the call: nothing is read back from Python). Each step rounded as reference.expert_ffn's
    PyTorch ops round it (silu is PyTorch's own)."""
    _require().experts_decode(x, w13, w2, weights, cols, out)


@dataclass(frozen=True)
class A8Projection:
    """One projection of a packed expert as experts_decode_a8 takes it: kind 0 int8 rows (q, s), 1 int4
    (q, s, z; a = group size, b = symmetric), 2 GGUF rows (the matrices, gate and up together; a = block
    bytes), 3 GGUF Q4_K rows repacked (q, sc, mn, dd), 4 GGUF Q6_K rows repacked (ql, qh, sc, d). Read in
    place, with 8-bit activations."""

    kind: int
    tensors: tuple[torch.Tensor, ...]
    a: int = 0
    b: int = 0


def a8_int8(q: torch.Tensor, s: torch.Tensor) -> A8Projection:
    """int8 rows q [N, K] with fp16 scales s [N]."""
    return A8Projection(0, (q, s))


def a8_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int, symmetric: bool
            ) -> A8Projection | None:
    """int4 rows (int4_linear's layout), or None for a group size the 8-bit kernel does not take."""
    if not (group_size % 64 == 0 or group_size in (8, 16, 32)):
        return None
    return A8Projection(1, (q, s, z), group_size, int(symmetric))


def a8_q4k(q: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, dd: torch.Tensor) -> A8Projection:
    """GGUF Q4_K rows repacked (q4k_linear's layout)."""
    return A8Projection(3, (q, sc, mn, dd))


def a8_q6k(ql: torch.Tensor, qh: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> A8Projection:
    """GGUF Q6_K rows repacked (q6k_linear's layout)."""
    return A8Projection(4, (ql, qh, sc, d))


def a8_gguf(qs: list[torch.Tensor], block_type: str) -> A8Projection | None:
    """GGUF rows of `block_type` (gate and up: two matrices, outputs concatenated), or None for a type
    the kernels do not read."""
    if block_type not in GGUF_BLOCK_BYTES or not all(q.is_contiguous() for q in qs):
        return None
    return A8Projection(2, tuple(qs), GGUF_BLOCK_BYTES[block_type])


def experts_decode_a8(x: torch.Tensor, experts: list[tuple[A8Projection, A8Projection]], weights: torch.Tensor,
                      cols: list[int], out: torch.Tensor) -> None:
    """out [1, H] += sum_j weights[cols[j]] * down_j(silu(gate_j x) * up_j x) for one token x [1, H]
    (float32 / bfloat16) and packed experts given as (gate|up, down) projections, read in place against
    8-bit activations; each step rounded as the PyTorch ops around the same kernels round it (what
    reference.moe_loop computes through the pool's ffn)."""
    specs = [p for pair in experts for p in pair]
    _require().experts_decode_a8(x, [p.kind for p in specs], [list(p.tensors) for p in specs], [p.a for p in specs],
                                 [p.b for p in specs], weights, cols, out)


def use_for(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` runs here: cpu, at most MAX_ROWS rows, float32 / bfloat16 weights, and
    the kernels built."""
    return (x.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous()
            and x.numel() <= MAX_ROWS * x.shape[-1] and w.dim() == 2 and available())
