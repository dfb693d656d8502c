#!/usr/bin/env python
"""Every GPU check and benchmark in one call (a lent GPU comes with ~15 minutes in all).

    python benchmarks/gpu_check.py            # on the GPU machine; writes $OUT/*.json (or benchmarks/results/)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU: exercises the script itself

Sections (each timed and isolated: a failure is recorded, the next section still runs):
  offload_exactness  offloaded == resident on CUDA (bf16, fp16; triton backend), tokens and logits,
                     several capacities; the bundled model's greedy tokens with a small cache
  cuda_link          the demand-first link on real streams: exact decoding with small and default chunks; a
                     demand copy behind 6 queued prefetch experts, 8 MiB vs whole-expert chunks; prefetch GB/s
  copy_engine        pinned vs pageable host->device GB/s for one Mixtral-8x7B expert (352 MB), and
                     overlap of copy-stream loads with a compute-stream kernel
  kernels            benchmarks/kernel_speed.py (Mixtral shapes, bf16, T in 1..256)
  quant_kernels      fused_moe_quant (int8; int4 at G=32/64/128) vs the torch dequant loop, and weight GB/s
                     at decode T=1/4/16, bf16, Mixtral (E=8,k=2) and Qwen3-MoE (E=128,k=8,I=768) shapes
  gguf_kernels       fused_moe over GGUF rows (Q4_K gate/up with Q6_K down as in Q4_K_M files; Q8_0; Q4_0;
                     MXFP4) vs the loop's torch dequantization, weight GB/s, the same shapes and tokens (the
                     GGUF kernel variants are otherwise tested only under the Triton interpreter)
  decode             benchmarks/decode.py (only with --only ...,decode: it builds a 17 GB pinned store and
                     takes 3-5 minutes; run it as a second call when the budget allows)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import moe_offload  # noqa: E402
from moe_offload.results import result_metadata, write_json_atomic  # noqa: E402
from moe_offload.options import OffloadConfig


def offload_exactness(device: torch.device, smoke: bool) -> dict:
    from helpers import write_model  # tests/helpers.py: a small random Mixtral checkpoint

    out = {}
    prompt = [1, 7, 3, 9, 11, 4, 2, 8, 5, 13, 6, 21]
    backend = "triton" if device.type == "cuda" else "loop"
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp))
        for dtype in ("bfloat16", "float16"):
            ref = moe_offload.load(path, device=device, dtype=dtype, offload=False, config=OffloadConfig.make(moe_backend=backend))
            ref_logits, ref_tokens = ref.logits(prompt), ref.generate(prompt, max_new_tokens=16).token_ids
            loop = moe_offload.load(path, device=device, dtype=dtype, offload=False, config=OffloadConfig.make(moe_backend="loop"))
            tri_vs_loop = ((ref_logits - loop.logits(prompt)).abs().max() / loop.logits(prompt).abs().max()).item()
            rows = []
            for cap in (2, 3, 5, 8):
                m = moe_offload.load(path, device=device, dtype=dtype, config=OffloadConfig.make(cache_experts=cap, moe_backend=backend))
                lg = m.logits(prompt)
                toks = m.generate(prompt, max_new_tokens=16)
                rows.append({"capacity": cap, "tokens_equal": toks.token_ids == ref_tokens,
                             "prefill_logits_max_rel_diff": ((lg - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                             "misses": toks.stats["misses"], "stall_seconds": toks.stats["stall_seconds"]})
            out[dtype] = {"triton_vs_loop_max_rel_diff": tri_vs_loop, "by_capacity": rows}
    bundled_ref = moe_offload.load(device=device, offload=False)
    small = moe_offload.load(device=device, cache_per_layer=2)
    a = bundled_ref.generate("In the beginning", max_new_tokens=32)
    b = small.generate("In the beginning", max_new_tokens=32)
    out["bundled_greedy_tokens_equal_cache_per_layer_2"] = a.token_ids == b.token_ids
    out["bundled_decode_tok_per_s"] = {"resident": a.stats["decode_tokens_per_second"],
                                       "cache_per_layer_2": b.stats["decode_tokens_per_second"]}
    out["bundled_text"] = a.text
    return out


def copy_engine(device: torch.device, smoke: bool) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    from moe_offload.offload import CudaLinkEngine

    nbytes = (1 << 20) if smoke else 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16
    res = {"expert_bytes": nbytes}
    dst = torch.empty(4, nbytes, dtype=torch.uint8, device=device)
    for name, pin in (("pinned", True), ("pageable", False)):
        src = torch.empty(4, nbytes, dtype=torch.uint8, pin_memory=pin)
        eng = CudaLinkEngine(device)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            hs = [eng.load((0, i), src[i], dst[i], i) for i in range(4)]
            for h in hs:
                eng.wait(h)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[f"{name}_gbps"] = 4 * nbytes / min(times) / 1e9
    # Overlap: a compute-stream matmul loop alone, copies alone, then both at once.
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    src = torch.empty(4, nbytes, dtype=torch.uint8, pin_memory=True)
    eng = CudaLinkEngine(device)

    def compute():
        for _ in range(20):
            a @ a

    def copies():
        return [eng.load((0, i), src[i], dst[i], i) for i in range(4)]

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    compute()
    t_compute, t_copy = timed(compute), timed(copies)
    t_both = timed(lambda: (copies(), compute()))
    res.update({"compute_s": t_compute, "copy_s": t_copy, "both_s": t_both,
                "overlap_fraction": (t_compute + t_copy - t_both) / min(t_compute, t_copy)})
    return res


def cuda_link(device: torch.device, smoke: bool) -> dict:
    """The demand-first link on real streams (offload.cuda_link): offloaded decoding exact with small
    and default chunks; how long a demand copy takes behind 6 queued prefetch experts with whole-expert
    chunks and with the default 8 MiB chunks; prefetch throughput of each (worker wake-up gaps)."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    from helpers import write_model
    from moe_offload.offload import CudaLinkEngine
    from moe_offload.offload.link import DEFAULT_CHUNK_BYTES

    res: dict = {}
    prompt = [1, 7, 3, 9, 11, 4, 2, 8, 5, 13, 6, 21]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp))
        ref = moe_offload.load(path, device=device, offload=False).generate(prompt, max_new_tokens=16).token_ids
        for mb in (0.001, 8.0):  # ~1 KiB chunks (several per expert here), and the default
            m = moe_offload.load(path, device=device, predictor="next-gate", config=OffloadConfig.make(
                cache_experts=3, lookahead=1, prefetch_margin=1, link_chunk_mb=mb, cpu_experts="off"))
            m.prefetcher.max_inflight = 4
            res[f"tokens_equal_link_chunk_mb_{mb:g}"] = m.generate(prompt, max_new_tokens=16).token_ids == ref
    nbytes = (1 << 20) if smoke else 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16
    src = torch.empty(7, nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(7, nbytes, dtype=torch.uint8, device=device)
    for name, make in (("whole", lambda: CudaLinkEngine(device, chunk_bytes=1 << 40)),
                       ("chunked", lambda: CudaLinkEngine(device, chunk_bytes=DEFAULT_CHUNK_BYTES))):
        eng = make()
        time.sleep(0.1)
        res[f"{name}_worker_alive"] = eng._thread.is_alive()  # it binds the device first thing
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hs = [eng.load((0, i), src[i], dst[i], i, prefetch=True, priority=1.0) for i in range(6)]
        d = eng.load((1, 0), src[6], dst[6], 6)
        eng.wait(d)
        d.cuda_event.synchronize()
        t_demand = time.perf_counter() - t0
        for h in hs:
            eng.wait(h)
        torch.cuda.synchronize()
        t_all = time.perf_counter() - t0
        eng.close()
        res[name] = {"demand_seconds": t_demand, "all_seconds": t_all, "gbps": 7 * nbytes / t_all / 1e9}
        # one prefetch alone, nobody waiting: the chunked engine's worker feeds it chunk by chunk
        eng = make()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = eng.load((2, 0), src[0], dst[0], 0, prefetch=True, priority=1.0)
        eng.drain()
        eng.wait(h)
        torch.cuda.synchronize()
        res[name]["one_prefetch_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
        eng.close()
    res["demand_speedup"] = res["whole"]["demand_seconds"] / res["chunked"]["demand_seconds"]
    res["throughput_ratio"] = res["chunked"]["one_prefetch_gbps"] / res["whole"]["one_prefetch_gbps"]
    return res


# Quantized fused MoE vs torch dequant-then-matmul (same dequantized bf16 weights; only accumulation order).
QUANT_REL_TOL = 3e-2


def _random_quant_pool(e: int, h: int, i: int, fmt: str, group: int, device: torch.device):
    """A packed pool of e random experts (random bytes; sane scales and zeros), built on device."""
    from moe_offload.formats import expert_bytes, get_format

    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.randint(0, 256, (e, expert_bytes(h, i, fmt, group)), dtype=torch.uint8, device=device, generator=g)
    pool = get_format(fmt, group).pool_views(rows, h, i)
    for s, fan_in in ((pool.s13, h), (pool.s2, i)):
        s.copy_(torch.rand(s.shape, device=device, generator=g) * (2.0 / (8 if fmt == "int4" else 127)) / fan_in ** 0.5)
    for z in (pool.z13, pool.z2):
        if z is not None:
            z.copy_(torch.randint(0, 16, z.shape, device=device, generator=g).half())
    return pool, expert_bytes(h, i, fmt, group)


def quant_kernels(device: torch.device, smoke: bool) -> dict:
    from moe_offload.kernels import fused_moe_reference
    from moe_offload.kernels import fused_moe_quant

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"mixtral": (8, 2, 4096, 14336), "qwen3_moe": (128, 8, 2048, 768)}
    if smoke:
        shapes = {"tiny": (8, 2, 64, 96), "tiny_top8": (16, 8, 64, 32)}
    formats = [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]
    out = {"rows": [], "tolerance": QUANT_REL_TOL}
    for name, (e, k, h, i) in shapes.items():
        for fmt, group in formats if not smoke else formats[:2]:
            pool, row_bytes = _random_quant_pool(e, h, i, fmt, group, device)
            slots = torch.arange(e, dtype=torch.int32, device=device)
            for t in (1, 4, 16) if not smoke else (1, 4):
                x = torch.randn(t, h, device=device).to(dtype)
                ids = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(t)])
                w = torch.softmax(torch.randn(t, k, device=device), -1)
                ref = fused_moe_reference(x, ids, w, pool, None, slots)
                got = fused_moe_quant(x, ids, w, pool, slots)
                rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                sec = _time(lambda: fused_moe_quant(x, ids, w, pool, slots), device, 2 if smoke else 20)
                touched = int(ids.unique().numel())
                out["rows"].append({"shape": name, "fmt": fmt, "group": group, "tokens": t, "max_rel_diff": rel,
                                    "us": sec * 1e6, "weight_GBps": touched * row_bytes / sec / 1e9})
            del pool
    return out


GGUF_TYPES = (("Q4_K", "Q4_K", "Q6_K"), ("Q8_0",) * 3, ("Q4_0",) * 3, ("MXFP4",) * 3)
GGUF_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "MXFP4": ()}


def _random_gguf_pool(e: int, h: int, i: int, types: tuple[str, str, str], device: torch.device):
    """A GGUF slot-row pool of e random experts built on device: random block bytes, each block's fp16
    scales (MXFP4: its exponent byte) set so that a weight is about 1/sqrt(K)."""
    from moe_offload.formats.gguf import BLOCK_TYPES, GgufFormat

    fmt = GgufFormat(types)
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.randint(0, 256, (e, fmt.expert_bytes(h, i)), dtype=torch.uint8, device=device, generator=g)
    views = fmt.views(rows, h, i)
    for sec, qt, k in (("w1", types[0], h), ("w3", types[1], h), ("w2", types[2], i)):
        bt = BLOCK_TYPES[qt]
        blocks = views[sec].unflatten(-1, (-1, bt.nbytes))  # [E, N, blocks per row, bytes]
        nb = blocks.shape[:-1]
        per_weight = {"Q8_0": 64.0, "Q4_0": 4.0, "Q4_K": 32.0 * 8, "Q6_K": 64.0 * 16}.get(qt, 1.0)
        for off in GGUF_FP16_FIELDS[qt]:
            d = (torch.rand(nb, device=device, generator=g) / (per_weight * k ** 0.5)).half()
            blocks[..., off:off + 2] = d.unsqueeze(-1).view(torch.uint8)
        if qt == "MXFP4":  # 2**(e - 128) * (kvalues up to 12) ~ 1/sqrt(K)
            blocks[..., 0] = torch.randint(118, 123, nb, device=device, generator=g).to(torch.uint8)
    return fmt.pool_views(rows, h, i), fmt.expert_bytes(h, i)


def gguf_kernels(device: torch.device, smoke: bool) -> dict:
    """fused_moe on GGUF pools (Q4_K/Q6_K, Q8_0, Q4_0, MXFP4 decoded in registers) against the loop
    backend's torch dequantize-then-matmul of the same bytes, and the kernel's weight GB/s."""
    from moe_offload.kernels import fused_moe_quant, fused_moe_reference

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"mixtral": (8, 2, 4096, 14336), "qwen3_moe": (128, 8, 2048, 768)}
    if smoke:
        shapes = {"tiny": (4, 2, 256, 256)}
    out = {"rows": [], "tolerance": QUANT_REL_TOL}
    for name, (e, k, h, i) in shapes.items():
        for types in GGUF_TYPES if not smoke else GGUF_TYPES[:2]:
            pool, row_bytes = _random_gguf_pool(e, h, i, types, device)
            slots = torch.arange(e, dtype=torch.int32, device=device)
            for t in (1, 4, 16) if not smoke else (1, 4):
                x = torch.randn(t, h, device=device).to(dtype)
                ids = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(t)])
                w = torch.softmax(torch.randn(t, k, device=device), -1)
                ref = fused_moe_reference(x, ids, w, pool, None, slots)
                got = fused_moe_quant(x, ids, w, pool, slots)
                rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                sec = _time(lambda: fused_moe_quant(x, ids, w, pool, slots), device, 2 if smoke else 20)
                loop = _time(lambda: fused_moe_reference(x, ids, w, pool, None, slots), device, 1 if smoke else 5)
                touched = int(ids.unique().numel())
                out["rows"].append({"shape": name, "fmt": ",".join(types), "tokens": t, "max_rel_diff": rel,
                                    "finite": bool(torch.isfinite(got).all()), "us": sec * 1e6, "loop_us": loop * 1e6,
                                    "weight_GBps": touched * row_bytes / sec / 1e9})
            del pool
    return out


def _time(fn, device: torch.device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


SCRIPTS = {"kernels": "kernel_speed"}  # check name -> benchmarks/<file>.py where the two differ


def script(name: str, smoke: bool, out_dir: Path) -> dict:
    out = out_dir / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{SCRIPTS.get(name, name)}.py"), "--out", str(out)] + (["--smoke"] if smoke else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    print(r.stdout)
    return json.loads(out.read_text())


# Offloaded vs resident logits, relative to the largest logit: the same kernels on the same inputs, so
# only the GEMM row blocking differs (grouped prefill); a few units of the dtype's rounding.
REL_TOL = {"bfloat16": 3e-2, "float16": 4e-3, "float32": 1e-4}


def section_failures(name: str, value: object) -> list[str]:
    """What in a section's result is wrong: a section is ok only when this is empty."""
    out: list[str] = []
    if name == "offload_exactness":
        for dtype, tol in REL_TOL.items():
            for row in value.get(dtype, {}).get("by_capacity", []):
                if not row["tokens_equal"]:
                    out.append(f"{dtype} capacity {row['capacity']}: offloaded tokens differ from resident")
                if row["prefill_logits_max_rel_diff"] > tol:
                    out.append(f"{dtype} capacity {row['capacity']}: prefill logits rel diff "
                               f"{row['prefill_logits_max_rel_diff']:.2e} > {tol:.0e}")
        if value.get("bundled_greedy_tokens_equal_cache_per_layer_2") is False:
            out.append("bundled model: cache_per_layer=2 greedy tokens differ from resident")
    if name == "quant_kernels":
        out += [f"{r['shape']} {r['fmt']} G={r['group']} T={r['tokens']}: rel diff {r['max_rel_diff']:.2e} > "
                f"{QUANT_REL_TOL:.0e}" for r in value["rows"] if not r["max_rel_diff"] <= QUANT_REL_TOL]
    if name == "gguf_kernels":
        out += [f"{r['shape']} gguf:{r['fmt']} T={r['tokens']}: rel diff {r['max_rel_diff']:.2e} > {QUANT_REL_TOL:.0e}"
                for r in value["rows"] if not r["max_rel_diff"] <= QUANT_REL_TOL]
        out += [f"{r['shape']} gguf:{r['fmt']} T={r['tokens']}: output not finite" for r in value["rows"]
                if not r["finite"]]
    if name == "cuda_link" and "skipped" not in value:
        out += [f"offloaded tokens differ from resident with {k}" for k, v in value.items()
                if k.startswith("tokens_equal") and not v]
        if not (value.get("whole_worker_alive") and value.get("chunked_worker_alive")):
            out.append("the CudaLinkEngine worker thread died at start (see the output for its traceback)")
        if not value["demand_speedup"] > 2:  # behind 6 whole experts vs about one expert plus 2 chunks
            out.append(f"a demand copy behind 6 prefetches is only {value['demand_speedup']:.2f}x faster with 8 MiB "
                       "chunks than with whole-expert chunks")
        if not value["throughput_ratio"] > 0.8:
            out.append(f"one chunked prefetch moves at {value['throughput_ratio']:.2f} of a whole-expert copy's GB/s "
                       "(idle gaps)")
    if name == "sync_debug" and value.get("reads_per_layer") != 1:
        out.append(f"decode step made {value.get('reads_per_layer')} device->host reads per MoE layer, want 1")
    if isinstance(value, dict) and value.get("ok") is False:
        out.append(f"{name}: the script reported ok: false")
    return out


def sync_debug(device: torch.device, smoke: bool) -> dict:
    """One decode step of the offloaded bundled model under torch.cuda.set_sync_debug_mode("error"),
    allowing exactly the per-layer read of routed ids (offload.experts.read_back): any other host sync
    in the decode hot path raises."""
    if device.type != "cuda":
        return {"skipped": "needs cuda", "reads_per_layer": 1}
    import moe_offload.offload.experts as ox

    m = moe_offload.load(device=device, cache_per_layer=4)
    net, kv = m.model, m.kv_cache
    ids = m.encode("In the beginning God created")
    reads = []
    orig = ox.read_back

    def allowed(t):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(1)
            return orig(t)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    with torch.inference_mode():
        logits = net(torch.tensor([ids], device=device), 0, kv)[0, -1]
        tok = int(logits.argmax())
        step = torch.tensor([[tok]], device=device)
        torch.cuda.synchronize()
        ox.read_back = allowed
        torch.cuda.set_sync_debug_mode("error")
        try:
            net(step, len(ids), kv, host_ids=(tok,))
        finally:
            torch.cuda.set_sync_debug_mode(0)
            ox.read_back = orig
    return {"reads_per_layer": len(reads) / m.config.num_hidden_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="offload_exactness,sync_debug,cuda_link,copy_engine,kernels,quant_kernels,"
                                      "gguf_kernels")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    results = {**result_metadata(device), "sections": {}}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            fn = {"offload_exactness": offload_exactness, "copy_engine": copy_engine, "cuda_link": cuda_link,
                  "sync_debug": sync_debug, "quant_kernels": quant_kernels, "gguf_kernels": gguf_kernels}.get(name)
            value = fn(device, args.smoke) if fn else script(name, args.smoke, out_dir)
            failures = section_failures(name, value)
            results["sections"][name] = {"ok": not failures, "failures": failures,
                                         "seconds": time.perf_counter() - t0, "result": value}
        except Exception as exc:
            results["sections"][name] = {"ok": False, "seconds": time.perf_counter() - t0,
                                         "error": "".join(traceback.format_exception(exc))[-4000:]}
        print(f"== {name}: {json.dumps(results['sections'][name], default=str)[:2000]}", flush=True)
        write_json_atomic(out_dir / "gpu_check.json", results)  # partial results survive a timeout
    print(f"wrote {out_dir / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
