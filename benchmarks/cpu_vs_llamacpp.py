#!/usr/bin/env python
"""CPU decode and prefill, moe_offload against llama.cpp, same machine, same run, interleaved.

Builds nothing. llama.cpp's tools come from arguments (or environment variables): the folder holding
`llama-bench` and `llama-quantize` (--llama-bin / LLAMA_CPP_BIN) and its `convert_hf_to_gguf.py`
(--convert / LLAMA_CPP_CONVERT; by default searched in the source tree above the binary folder).
With --make-model the script writes the issue's 734M Mixtral-shaped model (vocab 4096, hidden 1024,
intermediate 3584, 8 layers, 16 heads / 4 kv, 8 experts top-2, random weights, the bundled model's
tokenizer) into --model; else --model names an existing Mixtral folder.

For each precision it converts (f32, bf16) or converts and quantizes (q8_0, q4_0, q4_k_m) a GGUF with
llama.cpp's tools, then alternates, for --repeats rounds: `llama-bench -t T -p P1,P2 -n N -r 1` and
ours (`moe_offload.load(folder, OffloadConfig.make(device="cpu", dtype=..., expert_dtype=...))`:
prefill of P1 and of P2 tokens, decode N tokens after the P1-token prompt; prompts from the bundled
held-out text). Ours at q8_0 / q4_0 is the project's int8 / int4 group-32 experts (bf16 compute) and, where
the GGUF loads, the same GGUF file read by moe_offload; those run with the default int8 activations
(`cpu_activations`) and again with exact ones ("ours_exact"); "gguf_paired" then decodes our own format, the
GGUF as loaded (experts copied into RAM) and the GGUF read from its map in one process, in turn, for
--paired-rounds rounds (gguf_ab). Each row reports median tokens/s for decode
and prefill, the ratio ours / llama.cpp, and the bandwidth each reaches: bytes of weights read per
decoded token (dense weights + top-k of the experts; the embedding row not counted) / time per token,
beside this machine's copy bandwidth (a STREAM-like copy of 256 MiB, measured in the same run).

    python benchmarks/cpu_vs_llamacpp.py --llama-bin LLAMA/build/bin --model /tmp/m734 --make-model \\
        [--threads 2] [--prompts 64,512] [--gen 32] [--repeats 3] [--precisions f32,bf16,q8_0,q4_0]

Threads: 2 is this project's reference machine (2 cores). On bigger machines run it again with
--threads 1 and with the physical core count; the JSON records the thread count and the CPU. At 1 thread
on the reference machine (2026-12-07, --repeats 1 --precisions bf16,q8_0,q4_0), decode ours / llama.cpp
tok/s: bf16 31.7 / 24.2, int8 / q8_0 51.0 / 36.3, int4 g32 / q4_0 57.2 / 47.1; prefill 64: 234 / 102,
165 / 121, 195 / 162.
Writes benchmarks/results/cpu_vs_llamacpp.json (or --out) and prints a table.

    python benchmarks/cpu_vs_llamacpp.py --crossover [--threads 2]

prints only the rows-of-x sweep that sets moe_offload/kernels/cpu_gemv.py's MAX_ROWS / QUANT_MAX_ROWS
(a full run records it in its JSON, key "crossover").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import moe_offload
from moe_offload.results import result_metadata, write_json_atomic

from _paths import ROOT, env_path, shown

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
# precision -> (GGUF outtype of the conversion, llama-quantize type or None, our OffloadConfig settings)
PRECISIONS = {
    "f32": ("f32", None, dict(dtype="float32")),
    "bf16": ("bf16", None, dict(dtype="bfloat16")),
    "q8_0": ("f32", "Q8_0", dict(dtype="bfloat16", expert_dtype="int8")),
    "q4_0": ("f32", "Q4_0", dict(dtype="bfloat16", expert_dtype="int4", group_size=32)),
    # the most downloaded GGUF type (Q4_K experts, some Q6_K): ours is its nearest own format, int4 group 32
    "q4_k_m": ("f32", "Q4_K_M", dict(dtype="bfloat16", expert_dtype="int4", group_size=32)),
    # like for like: llama.cpp's q8_0 / q4_0 files quantize the attention and output weights too
    "q8_0+dense": ("f32", "Q8_0", dict(dtype="bfloat16", expert_dtype="int8", dense_dtype="int8")),
    "q4_0+dense": ("f32", "Q4_0", dict(dtype="bfloat16", expert_dtype="int4", group_size=32, dense_dtype="int8")),
}
CONVERT = r"""
import sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {gguf_py!r})
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
import convert_hf_to_gguf as c
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):  # the bundled tokenizer is GPT-2-style byte-level BPE, unknown by hash
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
def no_spm(self):  # no tokenizer.model in the folder: skip the sentencepiece attempt (its import)
    raise FileNotFoundError("tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_spm
c.main()
"""


def make_model(folder: Path) -> None:
    """The 734M random Mixtral-shaped model, fp32 safetensors, with the bundled tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(**SHAPE, head_dim=64, max_position_embeddings=4096, rope_theta=1e6, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moe_offload.runtime.bundled_model_path() / f, tmp / f)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def stream_copy_gbs(threads: int) -> float:
    """Bytes read + written per second by a copy of 256 MiB (best of 5), torch on `threads` threads."""
    a = torch.ones(64 << 20, dtype=torch.float32)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; on failure exit with its last lines of output."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise SystemExit(f"{Path(cmd[0]).name if cmd[1] != '-c' else 'convert_hf_to_gguf.py'} failed "
                         f"(exit {r.returncode}):\n{tail}")
    return r


def gguf_for(model: Path, work: Path, precision: str, bins: Path, convert: Path) -> Path:
    """The GGUF of `precision`, converted (and quantized) once; reused on later runs."""
    outtype, qtype, _ = PRECISIONS[precision]
    base = work / f"model-{outtype}.gguf"
    if not base.exists():
        src = convert.parent
        code = CONVERT.format(src=str(src), gguf_py=str(src / "gguf-py"), model=str(model), outtype=outtype,
                              out=str(base) + ".part")
        run([sys.executable, "-c", code], cwd=work)
        os.replace(str(base) + ".part", base)
    if qtype is None:
        return base
    out = work / f"model-{qtype.lower()}.gguf"
    if not out.exists():
        run([str(bins / "llama-quantize"), str(base), str(out) + ".part", qtype])
        os.replace(str(out) + ".part", out)
    return out


def llama_bench(bins: Path, gguf: Path, threads: int, prompts: list[int], gen: int) -> dict:
    r = run([str(bins / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)),
             "-n", str(gen), "-r", "1", "-o", "json"])
    out = {}
    for row in json.loads(r.stdout):
        if row.get("n_prompt", 0) > 0:
            out[f"prefill_{row['n_prompt']}_tok_s"] = float(row["avg_ts"])
        else:
            out["decode_tok_s"] = float(row["avg_ts"])
    return out


def ours(path: Path, opts: dict, threads: int, prompt_ids: list[int], prompts: list[int], gen: int) -> dict:
    m = moe_offload.load(path, moe_offload.OffloadConfig.make(device="cpu", threads=threads, **opts))
    try:
        object.__setattr__(m.config, "eos_token_ids", ())  # full-length runs
        m.generate(prompt_ids[:8], max_new_tokens=4)  # warm-up (and the kernels' build, once)
        out = {}
        for p in prompts:
            r = m.generate(prompt_ids[:p], max_new_tokens=1)
            out[f"prefill_{p}_tok_s"] = p / r.stats["prefill_seconds"]
        r = m.generate(prompt_ids[:prompts[0]], max_new_tokens=gen)
        out["decode_tok_s"] = r.stats["decode_tokens_per_second"]
        return out
    finally:
        m.close()


def gguf_ab(model: Path, ggufs: dict[str, Path], threads: int, prompt_ids: list[int], gen: int, rounds: int) -> list[dict]:
    """Ours on each quantized GGUF against the same model in our own format, loaded once each in this
    process and decoded in turn `rounds` times (the paired comparison the per-precision rows, one fresh
    load per run, are too noisy for): the GGUF as loaded (experts copied into RAM when they fit) and read
    from the file's map (the copy skipped, as for a file larger than the RAM available)."""
    from moe_offload.offload import packed

    out = []
    for prec, gguf in ggufs.items():
        cfg = lambda **o: moe_offload.OffloadConfig.make(device="cpu", threads=threads, **o)  # noqa: E731
        fits = packed.available_host_bytes
        try:
            models = {"own": moe_offload.load(model, cfg(**PRECISIONS[prec][2])),
                      "gguf": moe_offload.load(gguf, cfg(dtype="bfloat16"))}
            packed.available_host_bytes = lambda: 0  # no room for the copy: the file's map
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (its warning says so)
                models["gguf_map"] = moe_offload.load(gguf, cfg(dtype="bfloat16"))
        except moe_offload.MoeOffloadError as exc:
            out.append({"precision": prec, "error": str(exc)})
            continue
        finally:
            packed.available_host_bytes = fits
        runs: dict[str, list[float]] = {k: [] for k in models}
        try:
            for m in models.values():
                object.__setattr__(m.config, "eos_token_ids", ())
                m.generate(prompt_ids[:8], max_new_tokens=4)
            for _ in range(rounds):
                for k, m in models.items():
                    runs[k].append(m.generate(prompt_ids, max_new_tokens=gen).stats["decode_tokens_per_second"])
        finally:
            for m in models.values():
                m.close()
        med = {k: statistics.median(v) for k, v in runs.items()}
        out.append({"precision": prec, "own_options": PRECISIONS[prec][2], "decode_tok_s": med, "runs": runs,
                    "gguf_over_own": med["gguf"] / med["own"], "copy_over_map": med["gguf"] / med["gguf_map"]})
        print(f"[{prec}] paired decode tok/s: own {med['own']:.1f}, GGUF {med['gguf']:.1f} "
              f"({out[-1]['gguf_over_own']:.2f}x), GGUF from its map {med['gguf_map']:.1f}", file=sys.stderr)
    return out


MEMORY_CHILD = r"""
import json, sys
def rss():
    got = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            got[key] = int(line.split()[1]) * 1024
    return got
import torch, moe_offload
base = rss()
path, opts, threads, ids, gen = json.loads(sys.argv[1])
m = moe_offload.load(path, moe_offload.OffloadConfig.make(device="cpu", threads=threads, **opts))
object.__setattr__(m.config, "eos_token_ids", ())
m.generate(ids, max_new_tokens=gen)
after = rss()
tensors = list(m.model.parameters()) + list(m.model.buffers())
tensors += [t for p in m.model.parameters() for t in getattr(p, "int8_rows", ())]
dense = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
try:  # packed or offloaded experts live in the host store; resident float experts are parameters
    experts = m.store_info()["host_bytes"]
except moe_offload.MoeOffloadError:
    experts = 0
kv_row = (m.kv_cache.k[:, :, :, :1].nbytes + m.kv_cache.v[:, :, :, :1].nbytes)
print(json.dumps({"rss_mb": (after["RssAnon"] + after["RssFile"] - base["RssAnon"] - base["RssFile"]) / 2**20,
                  "weights_mb": (dense + experts) / 2**20, "kv_used_mb": kv_row * (len(ids) + gen) / 2**20,
                  "kv_allocated_mb": (m.kv_cache.k.nbytes + m.kv_cache.v.nbytes) / 2**20,
                  "max_seq_len": m.kv_cache.max_seq_len}))
"""


def ours_memory(path: Path, opts: dict, threads: int, prompt_ids: list[int], gen: int) -> dict:
    """Resident memory after one decode in a fresh process (RssAnon + RssFile, above the same process
    after `import moe_offload`) against the weights' bytes as held plus the KV cache as allocated (for
    max_seq_len, zero-filled, so resident; llama.cpp allocates its context's too)."""
    arg = json.dumps([str(path), opts, threads, prompt_ids, gen])
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, arg], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["over_weights_and_kv"] = out["rss_mb"] / (out["weights_mb"] + out["kv_allocated_mb"]) - 1
    return out


def dense_and_expert_params(cfg: dict) -> tuple[int, int]:
    """(dense parameters read per token, parameters of one expert)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    attn = h * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    router = h * cfg["num_local_experts"]
    return layers * (attn + router + 2 * h) + h + cfg["vocab_size"] * h, 3 * h * i


def ours_bytes_per_token(cfg: dict, precision: str) -> float:
    dense, expert = dense_and_expert_params(cfg)
    k, layers = cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    if precision == "f32":
        return 4 * (dense + k * layers * expert)
    base = precision.split("+")[0]
    # + fp16 scales; symmetric int4 keeps fp16 zeros too, which the 8-bit activation kernel does not read
    per_weight = {"bf16": 2.0, "q8_0": 1.0 + 2 / 1024, "q4_0": 0.5 + 2 / 32, "q4_k_m": 0.5 + 2 / 32}[base]
    per_dense = 1.0 + 2 / cfg["hidden_size"] if precision.endswith("+dense") else 2.0
    return per_dense * dense + k * layers * expert * per_weight


def gguf_bytes_per_token(gguf: Path, top_k: int, experts: int) -> float:
    """Bytes of the file's tensors read per token: all but the embedding, experts at top-k / E."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(str(gguf)).tensors:
        if t.name == "token_embd.weight":
            continue
        total += t.n_bytes * (top_k / experts if "_exps." in t.name else 1.0)
    return total


CROSSOVER_ROWS = [1, 2, 4, 8, 16, 32, 64, 128]


def crossover(threads: int, rows: list[int]) -> list[dict]:
    """ms per call at Mixtral-734M's w13 shape (7168 x 1024) as the rows of x grow: the compiled kernels
    against PyTorch's GEMM (bf16 weights) and against dequantize-then-matmul (int8, int4 group 32; bf16 x,
    so the kernels take int8 activations in the default mode), weights rotated over more memory than the
    caches hold. Chooses moe_offload/kernels/cpu_gemv.py's MAX_ROWS and QUANT_MAX_ROWS."""
    from moe_offload.formats.int4 import dequant_int4, quantize_int4
    from moe_offload.formats.int8 import dequant_int8, quantize_int8
    from moe_offload.kernels import cpu_gemv

    torch.set_num_threads(threads)
    cpu_gemv.set_activations("auto")
    n, k, count = 7168, 1024, 16
    q8 = [quantize_int8(torch.randn(n, k)) for _ in range(count)]
    q4 = [quantize_int4(torch.randn(n, k), 32) for _ in range(count)]
    wb = [torch.randn(n, k).bfloat16() for _ in range(count)]

    def ms(fn) -> float:
        fn(0)
        t0 = time.perf_counter()
        for i in range(count):
            fn(i)
        return (time.perf_counter() - t0) / count * 1e3

    out = []
    for m in rows:
        x = torch.randn(m, k).bfloat16()
        row = {"rows": m,
               "bf16_kernel_ms": ms(lambda i: cpu_gemv.linear(x, wb[i])),
               "bf16_torch_ms": ms(lambda i: torch.nn.functional.linear(x, wb[i])),
               "int8_kernel_ms": ms(lambda i: cpu_gemv.int8_linear(x, *q8[i])),
               "int8_dequant_matmul_ms": ms(lambda i: torch.nn.functional.linear(x, dequant_int8(*q8[i], torch.bfloat16))),
               "int4_kernel_ms": ms(lambda i: cpu_gemv.int4_linear(x, *q4[i], 32, symmetric=True)),
               "int4_dequant_matmul_ms": ms(lambda i: torch.nn.functional.linear(
                   x, dequant_int4(*q4[i], k, 32, torch.bfloat16)))}
        print("  " + ", ".join(f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()))
        out.append(row)
    return out


def _shown_args(argv: list[str]) -> list[str]:
    """The command line with folder arguments named as `shown` names them (no machine paths in results)."""
    out, paths = [], {"--llama-bin", "--convert", "--model", "--work", "--out"}
    for i, a in enumerate(argv):
        out.append(shown(a) if i and argv[i - 1] in paths else a)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", help="folder with llama-bench and llama-quantize (or LLAMA_CPP_BIN)")
    ap.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py (or LLAMA_CPP_CONVERT; default: "
                                      "searched above --llama-bin)")
    ap.add_argument("--model", help="Mixtral folder (written there with --make-model)")
    ap.add_argument("--make-model", action="store_true", help="write the 734M random model into --model first")
    ap.add_argument("--work", help="folder for the GGUF files (default: MODEL.gguf-work beside --model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="64,512", help="prompt lengths for prefill; decode follows the first")
    ap.add_argument("--gen", type=int, default=32, help="decoded tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paired-rounds", type=int, default=8,
                    help="decode rounds of the paired GGUF-vs-own comparison (one process, interleaved)")
    ap.add_argument("--precisions", default="f32,bf16,q8_0,q4_0,q4_k_m,q8_0+dense,q4_0+dense")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_vs_llamacpp.json"))
    ap.add_argument("--crossover", action="store_true",
                    help="only the kernels-vs-PyTorch sweep over rows of x (no llama.cpp, no model)")
    args = ap.parse_args()
    if args.crossover:  # printed only; a full run records it in its JSON
        crossover(args.threads, CROSSOVER_ROWS)
        return 0
    bins = env_path(args.llama_bin, "LLAMA_CPP_BIN")
    if bins is None or not (bins / "llama-bench").is_file():
        ap.error("--llama-bin (or LLAMA_CPP_BIN) must name the folder holding llama-bench and llama-quantize")
    convert = env_path(args.convert, "LLAMA_CPP_CONVERT")
    if convert is None:
        convert = next((p / "convert_hf_to_gguf.py" for p in bins.resolve().parents
                        if (p / "convert_hf_to_gguf.py").is_file()), None)
    if convert is None or not convert.is_file():
        ap.error("--convert (or LLAMA_CPP_CONVERT) must name llama.cpp's convert_hf_to_gguf.py")
    precisions = args.precisions.split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: unknown {bad}; choose from {sorted(PRECISIONS)}")
    if not args.model:
        ap.error("--model is required (a Mixtral folder; add --make-model to write the 734M one there)")
    model = Path(args.model).expanduser().resolve()
    if args.make_model:
        make_model(model)
    cfg = json.loads((model / "config.json").read_text())
    work = Path(args.work) if args.work else model.parent / (model.name + ".gguf-work")
    work.mkdir(parents=True, exist_ok=True)

    prompts = [int(p) for p in args.prompts.split(",")]
    text = moe_offload.bundled_heldout_text().read_text(encoding="utf-8")
    prompt_ids = moe_offload.load(model, device="cpu", offload=False).encode(text)[:max(prompts)]
    if len(prompt_ids) < max(prompts):
        ap.error(f"--prompts: the held-out text has only {len(prompt_ids)} tokens")
    copy_gbs = [stream_copy_gbs(args.threads)]
    rows = []
    for prec in precisions:
        print(f"[{prec}] converting ...", file=sys.stderr)
        gguf = gguf_for(model, work, prec, bins, convert)
        opts = PRECISIONS[prec][2]
        theirs_runs, ours_runs, ours_gguf_runs, exact_runs = [], [], [], []
        for rep in range(args.repeats):
            print(f"[{prec}] round {rep + 1}/{args.repeats}", file=sys.stderr)
            theirs_runs.append(llama_bench(bins, gguf, args.threads, prompts, args.gen))
            ours_runs.append(ours(model, opts, args.threads, prompt_ids, prompts, args.gen))
            if "expert_dtype" in opts and "+" not in prec:  # the same weights against exact bf16 activations
                exact_runs.append(ours(model, {**opts, "cpu_activations": "exact"}, args.threads, prompt_ids,
                                       prompts, args.gen))
            if PRECISIONS[prec][1] and "+" not in prec:  # the quantized GGUF read by moe_offload itself
                try:
                    ours_gguf_runs.append(ours(gguf, {"dtype": "bfloat16"}, args.threads, prompt_ids, prompts, args.gen))
                except moe_offload.MoeOffloadError as exc:
                    ours_gguf_runs.append({"error": str(exc)})
            copy_gbs.append(stream_copy_gbs(args.threads))
        memory = ours_memory(model, opts, args.threads, prompt_ids[:prompts[0]], args.gen)
        keys = ["decode_tok_s"] + [f"prefill_{p}_tok_s" for p in prompts]
        med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in keys}  # noqa: E731
        row = {"precision": prec, "gguf": gguf.name,
               "llama_cpp": {**med(theirs_runs), "bytes_per_token": gguf_bytes_per_token(
                   gguf, cfg["num_experts_per_tok"], cfg["num_local_experts"])},
               "ours": {**med(ours_runs), "bytes_per_token": ours_bytes_per_token(cfg, prec), "options": opts,
                        "memory": memory}}
        if exact_runs:
            row["ours_exact"] = med(exact_runs)
        if ours_gguf_runs:
            bad = [r["error"] for r in ours_gguf_runs if "error" in r]
            row["ours_on_gguf"] = {"error": bad[0]} if bad else med(ours_gguf_runs)
        for side in ("llama_cpp", "ours"):
            d = row[side]
            d["decode_gb_s"] = d["bytes_per_token"] * d["decode_tok_s"] / 1e9
        row["ratios"] = {k: row["ours"][k] / row["llama_cpp"][k] for k in keys}
        rows.append(row)

    ggufs = {prec: gguf_for(model, work, prec, bins, convert) for prec in precisions
             if PRECISIONS[prec][1] and "+" not in prec}
    paired = gguf_ab(model, ggufs, args.threads, prompt_ids[:prompts[0]], args.gen, args.paired_rounds)
    print("rows-of-x sweep (kernels vs PyTorch):", file=sys.stderr)
    sweep = crossover(args.threads, CROSSOVER_ROWS)
    result = {**result_metadata(), "benchmark": "cpu_vs_llamacpp", "threads": args.threads, "crossover": sweep,
              "cpu": platform.processor() or platform.machine(), "model": shown(model), "shape": SHAPE,
              "prompts": prompts, "decode_tokens": args.gen, "repeats": args.repeats,
              "copy_gb_s_median": statistics.median(copy_gbs), "copy_gb_s_runs": copy_gbs, "rows": rows,
              "gguf_paired": paired,
              "command": " ".join(["python", "benchmarks/cpu_vs_llamacpp.py"] + _shown_args(sys.argv[1:]))}
    write_json_atomic(args.out, result)
    print(f"copy bandwidth {result['copy_gb_s_median']:.1f} GB/s (read + write); {args.threads} threads")
    cols = ["decode_tok_s"] + [f"prefill_{p}_tok_s" for p in prompts]
    names = ["decode"] + [f"prefill {p}" for p in prompts]
    print("| precision | " + " | ".join(f"{n} tok/s ours / llama.cpp (ratio)" for n in names)
          + " | decode GB/s ours / llama.cpp | ours on the GGUF (decode) | ours, exact activations (decode) "
          "| ours resident vs weights + KV |")
    print("|" + " --- |" * (len(cols) + 5))
    for r in rows:
        o, t = r["ours"], r["llama_cpp"]
        g = r.get("ours_on_gguf", {})
        gtxt = "-" if not g else g["error"][:40] if "error" in g else f"{g['decode_tok_s']:.1f}"
        cells = [f"{o[k]:.1f} / {t[k]:.1f} ({r['ratios'][k]:.2f}x)" for k in cols]
        etxt = f"{r['ours_exact']['decode_tok_s']:.1f}" if "ours_exact" in r else "-"
        mem = o["memory"]
        mtxt = mem["error"][:40] if "error" in mem else (f"{mem['rss_mb']:.0f} MB vs {mem['weights_mb']:.0f} + "
                                                         f"{mem['kv_allocated_mb']:.0f} ({mem['over_weights_and_kv']:+.0%})")
        print(f"| {r['precision']} | " + " | ".join(cells)
              + f" | {o['decode_gb_s']:.1f} / {t['decode_gb_s']:.1f} | {gtxt} | {etxt} | {mtxt} |")
    for r in paired:
        if "error" in r:
            print(f"paired {r['precision']}: {r['error']}")
            continue
        d = r["decode_tok_s"]
        print(f"paired {r['precision']}: own {d['own']:.1f}, GGUF {d['gguf']:.1f} ({r['gguf_over_own']:.2f}x), "
              f"GGUF from its map {d['gguf_map']:.1f} (copy {r['copy_over_map']:.2f}x)")
    print(f"wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
