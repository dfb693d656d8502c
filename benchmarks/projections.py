#!/usr/bin/env python
"""Projected memory and decode speed of published MoE models in the formats they ship in, on named GPUs
and hosts, beside the public figures that exist for such boxes (each with its source).

PROJECTIONS, NOT MEASUREMENTS: every tokens/s below comes from `moe-offload simulate`'s event-driven
timeline, driven by a routing trace of the bundled tiny model (6 layers, top-2 of 8 experts), scaled to
each model (its layers, its top-k, the same resident share of each layer's experts); compute from
datasheet bandwidth, copies from link bandwidth, the CPU lane from the host profile (assets/*.json; the
CPU efficiencies are assumptions). Memory needs come from the format objects' byte sizes (exact for the
layouts named). Host profiles say nothing of RAM capacity: a row whose RAM needed exceeds the machine's
is a projection for a machine that holds it.

    moe-offload trace --text moe_offload/assets/heldout_kjv.txt --out heldout.npz --lookahead 1
    python benchmarks/projections.py --trace heldout.npz        # (without --trace: records one itself)
"""

from __future__ import annotations

import argparse
import os
import time

from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.projections import dense_bytes_per_param, memory_needs
from moe_offload.analysis.sim import get_cpu, get_hardware
from moe_offload.analysis.trace import load_trace, trace_prefix
from moe_offload.errors import MoeOffloadError
from moe_offload.results import result_metadata, write_json_atomic

from _paths import shown

MODELS = [("deepseek-v3", "q4_k_m"), ("deepseek-v3", "fp8"), ("gpt-oss-120b", "mxfp4"), ("glm-4.5-air", "bf16"),
          ("glm-4.5-air", "q4_k_m"), ("qwen3-30b-a3b", "bf16"), ("qwen3-30b-a3b", "q4_k_m"),
          ("qwen3-235b-a22b", "fp8"), ("qwen3-235b-a22b", "q4_k_m"), ("mixtral-8x7b", "bf16"),
          ("mixtral-8x7b", "q4_k_m")]
GPUS = ["rtx3090-pcie4", "rtx4090-pcie4", "rtx5090-pcie5", "h100-pcie5"]
HOSTS = ["desktop-ddr4-2ch", "desktop-ddr5-2ch"]

KT = "kvcache-ai/ktransformers, doc/en/DeepseekR1_V3_tutorial.md (README news, 2025-02-10)"
KT_VS = ("r/LocalLLaMA, 'KTransformers 2.1 and llama.cpp Comparison with DeepSeek V3' "
         "(reddit.com/r/LocalLLaMA/comments/1iq6ngx)")
HWC = "hardware-corner.net, 'GPT-OSS 120B: Offloading MoE Layers to CPU' (2025-11-10)"
OSS_14900K = "r/LocalLLaMA post quoted at gokawiil.com/article/74814 (llama.cpp PR 15157 era)"
OSS_6900 = "r/LocalLLaMA, 'Optimizing gpt-oss-120B on AMD RX 6900 XT 16GB: Achieving 19 tokens/sec'"
# (model, format, gpu or None = any GPU row with this host, host): [(tokens/s, what, source)]
PUBLIC = {
    ("deepseek-v3", "q4_k_m", "rtx4090-pcie4", "server-xeon-ddr5-4800-8ch"): [
        (8.73, "KTransformers, 4090D + one Xeon Gold 6454S socket (32 cores)", KT),
        (11.26, "KTransformers, both sockets (2 x 32 cores)", KT),
        (13.69, "KTransformers V0.3, 6 of 8 experts", KT),
        (4.51, "llama.cpp, same box, 2 x 32 cores", KT)],
    ("deepseek-v3", "q4_k_m", "rtx3090-pcie4", "server-epyc-ddr4-3200-8ch"): [
        (8.66, "KTransformers 2.1, RTX 3090 Ti + EPYC 7773X", KT_VS),
        (4.36, "llama.cpp CPU-only, same box", KT_VS)],
    ("gpt-oss-120b", "mxfp4", "rtx3090-pcie4", "desktop-ddr4-2ch"): [
        (1.6, "llama.cpp --n-cpu-moe 27, RTX 3090 + EPYC 7343, 64 GB DDR4-3200 (RAM below the model: paging)", HWC)],
    ("gpt-oss-120b", "mxfp4", None, "desktop-ddr5-2ch"): [
        (25.6, "llama.cpp --n-cpu-moe 36 (all experts on the CPU), i9-14900K, DDR5; GPU not named, ~8 GB VRAM used",
         OSS_14900K),
        (19.0, "llama.cpp, 28 MoE layers on the CPU, Ryzen 9 7900 + DDR5-5600 2ch, AMD RX 6900 XT", OSS_6900)],
}
EXTRA = [key[:4] for key in PUBLIC if key[2] is not None and key[3] not in HOSTS]  # the cited boxes themselves


def project(trace, model: str, fmt: str, gpu: str, host: str | None) -> dict:
    cfg = model_config(model)
    try:
        p = simulate(trace, cfg, get_hardware(gpu), fmt, None, "next-gate", cpu=get_cpu(host) if host else None,
                     deep_oracle_bound=False, dense_bytes_per_param=dense_bytes_per_param(fmt))
    except MoeOffloadError as exc:  # the dense weights and top-k slots do not fit the card
        return {"tokens_per_second": None, "why": str(exc)}
    s = p.settings
    return {"tokens_per_second": p.tokens_per_second, "per_token_seconds": p.per_token,
            "slots_per_layer": s["slots_per_layer"], "hit_rate": s["hit_rate"],
            "cpu_experts_per_token": s["cpu_experts_per_token"],
            "all_resident_tokens_per_second": p.limits["all_resident_tokens_per_second"]}


def public_for(model: str, fmt: str, gpu: str, host: str) -> list[dict]:
    out = []
    for (m, f, g, h), figs in PUBLIC.items():
        if (m, f, h) == (model, fmt, host) and g in (None, gpu):
            out += [{"tokens_per_second": t, "what": what, "source": src} for t, what, src in figs]
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


def _tps(v: float | None) -> str:
    return "does not fit" if v is None else f"{v:.1f}"


def markdown(rows: list[dict]) -> str:
    lines = ["Projections from a small-model routing trace (bundled 6-layer top-2-of-8 model, scaled to each model), "
             "NOT measurements. CPU lane on (missed experts computed on the host when that beats a copy); "
             "'link only': every miss copied over PCIe. Public figures are measurements by others on the boxes named.",
             "", "| model | format | GPU | host | RAM needed | VRAM needed (min) | projected tok/s | link only tok/s | "
             "public figure (source) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = "; ".join(f"{p['tokens_per_second']:g} tok/s: {p['what']} [{p['source']}]" for p in r["public"]) or ""
        lines.append(f"| {r['model']} | {r['format']} | {r['gpu']} | {r['host']} | {_gb(r['ram_needed_bytes'])} | "
                     f"{_gb(r['vram_needed_bytes'])} | {_tps(r['projected']['tokens_per_second'])} | "
                     f"{_tps(r['link_only']['tokens_per_second'])} | {pub} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help="from `moe-offload trace` (default: record the bundled model's)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "projections.json"))
    ap.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the table here")
    args = ap.parse_args()
    if args.trace:
        trace, where = trace_prefix(load_trace(args.trace), args.max_tokens), shown(args.trace)
    else:
        import moe_offload
        from moe_offload.analysis.trace import record_with_predictions

        m = moe_offload.load(device="cpu", offload=False)
        ids = m.encode_text(moe_offload.bundled_heldout_text().read_text())[: args.max_tokens]
        trace, where = record_with_predictions(m.model, ids, m.runtime.max_seq_len, 1), "bundled model, held-out text"
    t0 = time.perf_counter()
    rows, link_only = [], {}
    combos = [(m, f, g, h) for m, f in MODELS for g in GPUS for h in HOSTS] + EXTRA
    for model, fmt, gpu, host in combos:
        cfg = model_config(model)
        need = memory_needs(cfg, fmt)
        if (model, fmt, gpu) not in link_only:
            link_only[model, fmt, gpu] = project(trace, model, fmt, gpu, None)
        rows.append({"model": model, "format": fmt, "format_name": need["format_name"], "gpu": gpu, "host": host,
                     "bits_per_weight": need["bits_per_weight"], "ram_needed_bytes": need["host_ram_bytes"],
                     "vram_needed_bytes": need["device_min_bytes"], "vram_needs": need,
                     "projected": project(trace, model, fmt, gpu, host), "link_only": link_only[model, fmt, gpu],
                     "public": public_for(model, fmt, gpu, host)})
        print(f"{model:16s} {fmt:7s} {gpu:14s} {host:26s} {_tps(rows[-1]['projected']['tokens_per_second']):>12s} tok/s",
              flush=True)
    table = markdown(rows)
    print("\n" + table)
    meta = {**result_metadata("cpu"), "kind": "projection from a small-model trace, not a measurement",
            "trace": where, "trace_meta": {k: shown(v) if k in ("model", "text") and v else v for k, v in trace.meta.items()}, "tokens": len(trace.token_ids), "seconds": time.perf_counter() - t0,
            "settings": "predictor next-gate, policy lru, capacity: what fits the card after dense + KV (4096 tokens) "
                        "+ reserve; dense weights at the format's bytes per parameter (analysis/projections.py)"}
    print(f"wrote {write_json_atomic(args.out, {**meta, 'results': rows})}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
