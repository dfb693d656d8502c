"""The `moe-offload` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from .errors import MoeOffloadError
from .validate import SEED_MAX, float_arg, int_arg, output_file

MAX_PROBLEM_LINES = 20
POS = int_arg(1)  # argparse types (validate.py): the error names the flag
NONNEG = int_arg(0)


def auto_or_rank(text: str) -> int | str:
    """argparse type: "auto" or a whole number >= 0."""
    return "auto" if text == "auto" else NONNEG(text)
NONNEG = int_arg(0)
SEED = int_arg(0, SEED_MAX)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face Mixtral folder (config.json, *.safetensors, tokenizer.json); "
                        "default: the bundled tiny model")


def _add_runtime_args(p: argparse.ArgumentParser, prefetch: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype; auto = float32 on cpu, the checkpoint's half type on cuda")
    p.add_argument("--moe-backend", default="auto", choices=["auto", "triton", "grouped_mm", "loop"],
                   help="expert compute: auto = triton on cuda, loop on cpu; triton on cpu needs "
                        "TRITON_INTERPRET=1 (slow, for tests)")
    p.add_argument("--max-seq-len", type=POS, default=None,
                   help="context length for the KV cache (default min(max_position_embeddings, 4096))")
    p.add_argument("--expert-dtype", default="auto", choices=["auto", "bf16", "fp16", "int8", "int4"],
                   help="expert storage: auto = the compute dtype; int8 (per-row scales) or int4 (asymmetric, "
                        "groups of --group-size) are quantized on load (moe backend loop)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                   help="int4 group size along the input dimension (default 128)")
    c = p.add_argument_group("expert cache (give at most one budget; default: fill free device memory)")
    c.add_argument("--cache-experts", type=POS, default=None, metavar="N", help="expert slots over all layers")
    c.add_argument("--cache-per-layer", type=POS, default=None, metavar="K", help="expert slots per layer")
    c.add_argument("--cache-gb", type=float_arg(0, lo_open=True), default=None, metavar="X", help="gigabytes of expert slots")
    c.add_argument("--policy", default="lru", choices=["lru", "lru-layer", "lfu", "predictive"],
                   help="eviction policy (default lru)")
    o = c.add_mutually_exclusive_group()
    o.add_argument("--offload", dest="offload", action="store_const", const=True, default=None,
                   help="experts in host RAM with a device expert cache (default on cuda)")
    o.add_argument("--no-offload", dest="offload", action="store_const", const=False,
                   help="keep every expert on the device (no cache; the reference for exactness; default "
                        "on cpu, where host RAM is the device and a cache would only hold experts twice)")
    if not prefetch:
        return
    c.add_argument("--predictor", default="auto", choices=["auto", "none", "next-gate", "m2r2"],
                   help="prefetch predictor; auto = m2r2 with the bundled/given accelerator, else next-gate; with the "
                        "CPU lane on (--cpu-experts auto, the default on cuda) and --policy lru-layer only cross-token "
                        "m2r2 adapters prefetch, since within-token prefetch loses there "
                        "(benchmarks/results/hybrid_prefetch.json)")
    c.add_argument("--lookahead", type=POS, default=None, metavar="D",
                   help="layers ahead to prefetch (default 2; with cross-token m2r2 adapters, their largest lookahead)")
    c.add_argument("--accelerator", default=None, metavar="FILE", help="M2R2 adapters (.safetensors)")
    c.add_argument("--prefetch-margin", type=NONNEG, default=None, metavar="M",
                   help="prefetch top-(k + M) experts per predicted layer (default 0; 3 for cross-token m2r2 adapters "
                        "with the CPU lane on)")
    c.add_argument("--prefetch-window", type=POS, default=None, metavar="W",
                   help="most prefetch copies in flight at once (default 1)")
    c.add_argument("--rank-depth", type=POS, default=None, metavar="N",
                   help="experts ranked per predicted layer (default: top-k + margin, the ones prefetched); deeper "
                        "ranks are not loaded but give --policy predictive an expected next use (layers until use / "
                        "P(use)) for more of the residents")
    c.add_argument("--link-chunk-mb", type=float_arg(0), default=None, metavar="MB",
                   help="demand-first link: prefetch copies move in chunks of MB MiB and a demand copy overtakes "
                        "the queued ones (on cuda at most two chunks are on the copy stream ahead of it); default 8; "
                        "0 = whole experts (on cuda: every copy in issue order)")
    c.add_argument("--cpu-experts", default=None, choices=["auto", "off"],
                   help="auto: compute a missed expert on the CPU from host RAM when that beats its copy "
                        "(measured CPU and link speed); off: copy every miss (default: auto on cuda, off on cpu)")


def _add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link-chunk-mb", type=float_arg(0), default=8.0, metavar="MB",
                   help="demand-first link: prefetch copies move in chunks of MB megabytes (MiB) and a demand "
                        "copy overtakes them at the next chunk; 0 = whole experts (default 8)")
    p.add_argument("--cpu", default="none", metavar="PROFILE",
                   help="CPU lane: compute a missed expert on this CPU profile (assets/cpu_profiles.json: "
                        "ci-epyc-2core, desktop-ddr4-2ch, desktop-ddr5-2ch) when that beats its copy; none = off")


def _link_settings(args: argparse.Namespace):
    from .analysis.sim import get_cpu

    from .offload.link import link_chunk_bytes

    try:
        chunk = link_chunk_bytes(args.link_chunk_mb)
    except MoeOffloadError as exc:
        raise MoeOffloadError(f"--link-chunk-mb: {exc}") from None
    return chunk, (get_cpu(args.cpu) if args.cpu != "none" else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-offload",
        description="Run Mixtral-class Mixture-of-Experts models with experts offloaded to host RAM.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate text. Streams the new text to stdout and a one-line summary "
                                   "to stderr; with --json prints one JSON object instead.")
    _add_model_args(g)
    g.add_argument("--prompt", default="In the beginning", help="prompt text (default: %(default)r)")
    g.add_argument("--max-new-tokens", type=NONNEG, default=64, metavar="N", help="default %(default)s")
    _add_runtime_args(g)
    g.add_argument("--temperature", type=float_arg(0), default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float_arg(0, 1, lo_open=True), default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=SEED, default=None, metavar="S", help="sampling seed (reproducible output)")
    g.add_argument("--stats", action="store_true", help="print the expert-cache stats to stderr at the end")
    g.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding: draft tokens with the draft head of the accelerator file "
                        "(--accelerator, or the bundled one) from an early layer, with resident experts only, "
                        "and verify them in one pass; output is exactly that of plain decoding")
    g.add_argument("--draft-tokens", type=POS, default=None, metavar="G",
                   help="most draft tokens per verify pass with --speculative (default 4; adapts below it)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, prompt_token_ids, stats, seconds, "
                        "tokens_per_second, finish_reason")

    t = sub.add_parser("train-accelerator", help="train M2R2 accelerator adapters for a model",
                       description="Run the frozen model over a text (offloaded when it does not fit; many "
                                   "tokens per expert load) and train low-rank adapters that predict the router "
                                   "choices of layers l+d from layer l. Reports held-out recall@d of next-gate "
                                   "and m2r2 at the end.")
    _add_model_args(t)
    t.add_argument("--text", required=True, metavar="FILE", help="UTF-8 training text (paragraphs split by blank lines)")
    t.add_argument("--out", required=True, metavar="FILE.safetensors", help="adapter file to write")
    t.add_argument("--lookahead", "--lookaheads", dest="lookaheads", default="1,2,3",
                   help="lookaheads d to train adapters for, comma list (default 1,2,3)")
    t.add_argument("--rank", type=POS, default=32, help="adapter rank R (default 32)")
    t.add_argument("--max-tokens", type=POS, default=None, metavar="N", help="use at most N tokens of the text")
    t.add_argument("--epochs", type=POS, default=4, help="passes over the training split (default 4)")
    t.add_argument("--lr", type=float_arg(0, lo_open=True), default=3e-3)
    t.add_argument("--window", type=int_arg(2), default=256, help="tokens per forward window (default 256)")
    t.add_argument("--heldout-fraction", type=float_arg(0, 1, lo_open=True), default=0.1, help="tail of the text held out (default 0.1)")
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument("--draft-exit", default=None, metavar="auto|M",
                   help="also train a draft head for --speculative at exit layer M (auto: the layer with the best "
                        "expected speedup on held-out text) into the same file")
    t.add_argument("--draft-only", action="store_true",
                   help="with --draft-exit: add or replace only the draft head in the existing --out file")
    t.add_argument("--draft-rank", type=POS, default=64, help="draft head rank (default 64)")
    t.add_argument("--rank-loss-weight", type=float_arg(0), default=None, metavar="W",
                   help="weight of a top-k ranking term (each true top-k logit above the strongest other "
                        "expert's) added to the distillation loss (default: 0 with --attention-peek, where it "
                        "cost -0.03 recall at d=1-2 on the bundled model; 1 without it, where it helped)")
    t.add_argument("--router-hint", action=argparse.BooleanOptionalAction, default=False,
                   help="feed layer l's own router distribution into each (l, d) adapter through a learned "
                        "[rank, experts] matrix (default off: measured +0.000 held-out recall on the bundled "
                        "model, benchmarks/results/predictor_v2_ablation.txt)")
    t.add_argument("--norm-gain", action=argparse.BooleanOptionalAction, default=False,
                   help="learn a per-(l, d) gain vector on the target layer's norm before its router "
                        "(default off: measured +0.000 held-out recall on the bundled model)")
    t.add_argument("--prev-context", action=argparse.BooleanOptionalAction, default=True,
                   help="each (l, d) adapter also reads the earlier positions at layer l: the previous "
                        "position's residual and a decayed mean of all earlier ones (decay 0.8), each through a "
                        "learned [rank, hidden] matrix; context the later layers' attention will mix in (default "
                        "on: +0.02/+0.04/+0.07 held-out recall at d=1/2/3 on the bundled model; "
                        "--no-prev-context: the current token's residual only, as files before it)")
    t.add_argument("--attention-peek", action=argparse.BooleanOptionalAction, default=True,
                   help="within-token predictions run through the real attention of the layers they pass (the "
                        "earlier positions' keys read from the KV cache) and, with --expert-rank, low-rank "
                        "stand-ins of their experts; the adapters correct the result (default on: held-out recall "
                        "0.96/0.95/0.95 at d=1/2/3 on the bundled model against 0.89/0.86/0.84 without, same "
                        "budget; costs one attention and one stand-in MoE per predicted layer at decode: in the "
                        "Mixtral-8x7B int4 projection it gains <1%% without the CPU lane and loses 5-15%% with it, "
                        "benchmarks/results/peek_cost_sim.json; --no-attention-peek for the cheaper v2 form)")
    t.add_argument("--expert-rank", type=auto_or_rank, default="auto", metavar="auto|R",
                   help="rank of each expert's stand-in on the attention-peek chain (default auto: 512 / experts "
                        "per layer, within 4..64, so 64 for Mixtral's 8 and 4 for 128, bounding the stand-ins' "
                        "size; 0 = no stand-ins, attention only: recall 0.93/0.88/0.86 on the bundled model against "
                        "0.96/0.95/0.95 at 64); ignored with --no-attention-peek")
    t.add_argument("--cross-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="with --cross-token: the rows past the last layer share one trunk per layer and keep only an "
                        "[experts, rank] logit head each (E*R parameters per row instead of 4*R*hidden; for Mixtral at "
                        "lookahead 64, rank 128, those rows take ~0.2 GB instead of ~13 GB). Default on: on the bundled model, same budget, "
                        "next-token recall 0.02-0.03 lower and the Mixtral-8x7B int4 projection 8.75 vs 8.89 tok/s "
                        "(benchmarks/results/simulate_issue12_cross_{heads,pairs}_4096.json); --no-cross-heads: a "
                        "residual adapter per row")
    t.add_argument("--cross-token", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the (l, d) adapters with l + d past the last layer: they predict the next "
                        "token's layers (l + d - L), so prefetch plans reach across the token boundary (give lookaheads "
                        "up to L at least; 2L measured best on the bundled model, with --policy predictive; "
                        "report rows 'd{d}-later')")
    _add_runtime_args(t, prefetch=False)

    r = sub.add_parser("trace", help="record routing (and predictions) over a text to .npz",
                       description="Record decode-order routing of a text (teacher forcing, chunked prefill): "
                                   "routed_ids, routed_weights, router_probs, pred_next_gate and, with "
                                   "--accelerator, pred_m2r2; plus token_ids and a JSON meta string.")
    _add_model_args(r)
    r.add_argument("--text", required=True, metavar="FILE")
    r.add_argument("--out", required=True, metavar="FILE.npz")
    r.add_argument("--max-tokens", type=POS, default=None, metavar="N")
    r.add_argument("--accelerator", default=None, metavar="FILE", help="also record m2r2 predictions")
    r.add_argument("--lookahead", type=POS, default=None, metavar="D",
                   help="lookahead of the recorded predictions (default 3; m2r2 from cross-token adapters: their whole "
                        "range). Past the --accelerator's range it is refused")
    _add_runtime_args(r, prefetch=False)

    b = sub.add_parser("bench", help="benchmarks (bench cache: hit rates of policies and predictors)")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    bc = bsub.add_parser("cache", help="cache-hit sweep over capacities x policies x predictors, with bounds",
                         description="Replay decode-order routing (from --trace, or recorded now from --text) "
                                     "through the real cache, policies and prefetcher for each capacity x policy x "
                                     "predictor, plus Belady (offline-optimal eviction, no prefetch) and oracle "
                                     "prefetch. 'On-time' hits use a link model: --hardware and --link-model sizes.")
    _add_model_args(bc)
    bc.add_argument("--text", default=None, metavar="FILE", help="text to route (default: the bundled held-out text)")
    bc.add_argument("--accelerator", default=None, metavar="FILE", help="record m2r2 predictions with these adapters "
                    "(default for the bundled model: its bundled adapters)")
    bc.add_argument("--trace", default=None, metavar="FILE", help="replay this trace (.npz) instead of recording one")
    bc.add_argument("--max-tokens", type=POS, default=4096, metavar="N", help="tokens to route / replay (default 4096)")
    bc.add_argument("--capacities", default=None, help="slots per layer, comma list (default 1..E)")
    bc.add_argument("--policies", default="lru,lru-layer,lfu,predictive")
    bc.add_argument("--predictors", default=None, help="default: none,next-gate and m2r2 when the trace has it")
    bc.add_argument("--lookahead", type=POS, default=2, metavar="D")
    bc.add_argument("--prefetch-margin", type=NONNEG, default=0, metavar="M")
    bc.add_argument("--prefetch-window", type=POS, default=1, metavar="W")
    bc.add_argument("--rank-depth", type=POS, default=None, metavar="N",
                    help="experts ranked per predicted layer for the predictive policy (default: top-k + margin)")
    bc.add_argument("--hardware", default="rtx4090-pcie4", help="link model for on-time hits (default %(default)s)")
    bc.add_argument("--link-model", default="mixtral-8x7b", help="model whose expert sizes the link moves (default %(default)s)")
    bc.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp16", "int8", "int4", "int3", "int2"],
                    help="expert format whose byte size (moe_offload.quant.formats) the link moves (default bf16)")
    _add_link_args(bc)
    bc.add_argument("--json", default=None, metavar="OUT", help="write the results JSON here")
    bc.add_argument("--plot", default=None, metavar="OUT.png", help="hit rate vs capacity (needs matplotlib)")

    sm = sub.add_parser("simulate", help="project decode tokens/s on hardware we do not have, from a trace",
                        description="Event-driven timeline (one compute stream, one copy stream) driven by a real "
                                    "routing trace; compute from bytes/bandwidth and flops/throughput, copies from "
                                    "link bandwidth and latency, prefetches from the recorded predictions.")
    sm.add_argument("--trace", required=True, metavar="FILE", help="from `moe-offload trace`")
    sm.add_argument("--hardware", required=True, help="one of: h100-pcie5, a100-pcie4, rtx4090-pcie4, rtx3060-pcie3, "
                    "rtx3080m-pcie4, t4-pcie3")
    sm.add_argument("--model-config", default="mixtral-8x7b", help="mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, olmoe-1b-7b or a config.json")
    sm.add_argument("--expert-dtype", default="bf16", choices=["bf16", "int8", "int4", "int3", "int2"],
                    help="expert storage; int3/int2 approximate the mixtral-offloading report's HQQ experts")
    sm.add_argument("--capacity", type=POS, default=None, help="expert slots of the real model (default: what fits)")
    sm.add_argument("--predictor", default="next-gate", help="none, next-gate, m2r2 (if in the trace), oracle or "
                    "deep-oracle (perfect knowledge 16 layers ahead, across tokens)")
    sm.add_argument("--policy", default="lru")
    sm.add_argument("--lookahead", type=POS, default=None, metavar="D")
    sm.add_argument("--prefetch-margin", type=NONNEG, default=0, metavar="M")
    sm.add_argument("--prefetch-window", type=POS, default=1, metavar="W")
    sm.add_argument("--rank-depth", type=POS, default=None, metavar="N",
                    help="experts ranked per predicted layer for the predictive policy (default: top-k + margin)")
    sm.add_argument("--bookkeeping-us", type=float_arg(0), default=20.0, help="host cost per layer (default 20 us)")
    sm.add_argument("--implementation", default="moe-offload", metavar="NAME",
                    help="implementation parameter set (assets/reference_impls.json): moe-offload (default: the "
                         "hardware figures as they are) or a fitted reference such as mixtral-offloading")
    _add_link_args(sm)
    sm.add_argument("--max-tokens", type=POS, default=4096, metavar="N", help="use the first N tokens of the trace")
    sm.add_argument("--json", action="store_true", help="print one JSON object")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE streaming)",
                        description="Serve the model over an OpenAI-compatible HTTP API: GET /v1/models, POST "
                                    "/v1/completions and /v1/chat/completions (streaming with stream=true), GET "
                                    "/health and GET /metrics (Prometheus). Requests decode together (continuous "
                                    "batching up to --max-batch). Binds to localhost unless --host says otherwise.")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    sv.add_argument("--port", type=int_arg(0, 65535), default=8000, help="port (default %(default)s)")
    sv.add_argument("--max-batch", type=POS, default=8, metavar="N",
                    help="most requests decoding together (default %(default)s)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require `Authorization: Bearer KEY` on every request but /health (default: the "
                         "MOE_OFFLOAD_API_KEY environment variable, else none)")
    sv.add_argument("--model-id", default="moe-offload", help="the model name clients send (default %(default)s)")
    _add_runtime_args(sv)

    qz = sub.add_parser("quantize", help="write a checkpoint with int8 / int4 experts (compressed-tensors)",
                        description="Quantize the routed experts of a model folder into a new folder: config.json "
                                    "(with a compressed-tensors pack-quantized quantization_config), the tokenizer "
                                    "files, non-expert weights as they were and packed experts with their scales "
                                    "(and zero points). Streams one expert at a time; `load(OUT)` then gives "
                                    "exactly the logits of quantizing on load.")
    _add_model_args(qz)
    qz.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, or be empty)")
    qz.add_argument("--expert-dtype", required=True, choices=["int8", "int4"],
                    help="int8: symmetric, one scale per output row; int4: asymmetric, groups of --group-size")
    qz.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                    help="int4 group size along the input dimension (default 128)")
    qz.add_argument("--force", action="store_true", help="replace a non-empty --out folder")

    i = sub.add_parser("info", help="model config, parameter counts, bytes per expert, memory plan",
                       description="Describe a checkpoint without loading its weights (headers only). "
                                   "With --device or a cache budget, also print the memory plan "
                                   "(dense weights, KV cache, expert slots, reserve).")
    _add_model_args(i)
    _add_runtime_args(i)
    i.add_argument("--config", metavar="FILE", default=None,
                   help="describe a bare config.json instead of a model folder (no weights needed)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "moe_backend": args.moe_backend,
                          "show_progress": sys.stderr.isatty()}
    if args.max_seq_len is not None:
        kw["max_seq_len"] = args.max_seq_len
    if getattr(args, "expert_dtype", "auto") != "auto":
        kw.update(expert_dtype=args.expert_dtype, group_size=args.group_size)
    kw.update(offload=args.offload, policy=args.policy, cache_experts=args.cache_experts,
              cache_per_layer=args.cache_per_layer, cache_gb=args.cache_gb)
    if getattr(args, "speculative", False):
        kw.update(speculative=True, draft_tokens=args.draft_tokens)
    elif getattr(args, "draft_tokens", None) is not None:
        kw["draft_tokens"] = args.draft_tokens
    if hasattr(args, "predictor"):
        kw.update(predictor=args.predictor, lookahead=args.lookahead, accelerator=args.accelerator,
                  prefetch_margin=args.prefetch_margin, prefetch_window=args.prefetch_window)
        if args.rank_depth is not None:
            kw["rank_depth"] = args.rank_depth
        if args.cpu_experts is not None:
            kw["cpu_experts"] = args.cpu_experts
        if args.link_chunk_mb is not None:
            kw["link_chunk_mb"] = args.link_chunk_mb
    else:
        kw["predictor"] = "none"
    return kw


def _offload_choice(model: Any, asked: bool | None) -> str:
    dev = model.runtime.device.type
    if asked is not None:
        why = "asked"
    elif model.expert_cache is not None and dev == "cpu":  # on cpu a cache option turns the cache on
        why = "a cache option was given"
    else:
        why = f"default on {dev}"
    if model.expert_cache is None:
        return f"experts all resident ({why})"
    pf = model.prefetcher
    note = getattr(model.model.experts, "prefetch_note", None)
    return (f"experts offloaded ({why}): {model.expert_cache.num_slots} slots, {model.expert_cache.policy.name}, "
            f"prefetch {pf.predictor.name if pf else 'none'}"
            + (f" (lookahead {pf.lookahead}, margin {pf.margin})" if pf else f" ({note})" if note else ""))


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import load

    model = load(args.model, **_runtime_kwargs(args))
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed)
    if args.json:
        res = model.generate(args.prompt, **kw)
        print(json.dumps(res.to_json()))
        return 0
    stream = model.generate(args.prompt, stream=True, **kw)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    res = stream.result
    print(f"[{len(res.token_ids)} tokens in {res.seconds:.2f} s, {res.tokens_per_second:.1f} tok/s "
          f"({res.stats['decode_tokens_per_second']:.1f} tok/s decode), stop: {res.finish_reason}, "
          f"device {model.runtime.device}, {str(model.runtime.dtype).removeprefix('torch.')}, "
          f"moe backend {model.runtime.moe_backend}, experts {model.runtime.expert_format or 'unquantized'}, "
          f"{_offload_choice(model, args.offload)}]", file=sys.stderr)
    if model.runtime.expert_format and model.runtime.device.type == "cpu" and str(model.runtime.dtype) == "torch.float32":
        print(f"[note: {model.runtime.expert_format} experts run fast on the CPU only at --dtype bfloat16: PyTorch's "
              "weight-only kernels have no fast float32 path (benchmarks/cpu_quant.py: 734M model, 2 threads, int4 "
              "7 tok/s at float32, 144 at bfloat16)]", file=sys.stderr)
    if res.stats.get("offload"):
        st = res.stats
        print(f"[expert cache: {st['capacity_slots']} slots, {st['policy']}: {st['uses']} uses, {st['hits']} hits, "
              f"{st['misses']} misses ({100 * st['hit_rate']:.1f}% hit rate), {st['bytes_h2d'] / 1e6:.1f} MB "
              f"copied, {st['stall_seconds'] * 1e3:.1f} ms stalled]", file=sys.stderr)
    if args.stats:
        print(json.dumps({k: v for k, v in res.stats.items() if k != "expert_uses"}, indent=1), file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    from .errors import MoeOffloadError

    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeOffloadError(f"{path}: cannot read the text: {exc}") from None


def _lookaheads(spec: str) -> list[int]:
    from .errors import MoeOffloadError

    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise MoeOffloadError(f"--lookaheads must be a comma list of positive integers, got {spec!r}")
    return values


def cmd_train_accelerator(args: argparse.Namespace) -> int:
    from .errors import MoeOffloadError
    from .predict.accelerator import model_fingerprint
    from .predict.train import train_accelerator
    from .results import write_json_atomic
    from .runtime import load

    lookaheads = _lookaheads(args.lookaheads)
    if not 0 < args.heldout_fraction < 1:
        raise MoeOffloadError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    draft_exit = _draft_exit(args.draft_exit)
    _cross_heads(args)  # a flag error before the model loads
    if args.draft_only and draft_exit is None:
        raise MoeOffloadError("--draft-only needs --draft-exit auto|M")
    _check_outputs(args, "--out")
    if args.draft_only and not os.path.isfile(args.out):
        raise MoeOffloadError(f"{args.out}: --draft-only adds a draft head to an existing adapter file; none is there")
    model = load(args.model, **_runtime_kwargs(args))
    ids = model.encode_text(_read_text(args.text))[: args.max_tokens]
    window = min(args.window, model.runtime.max_seq_len)
    if len(ids) < 4 * window:
        raise MoeOffloadError(f"{args.text}: {len(ids)} tokens is too little text; need at least {4 * window}")
    if args.draft_only:
        return _train_draft(args, model, ids, window, draft_exit)
    acc, report = train_accelerator(model.model, ids, lookaheads=lookaheads, rank=args.rank, epochs=args.epochs,
                                    lr=args.lr, window=window, heldout_fraction=args.heldout_fraction,
                                    seed=args.seed, show_progress=sys.stderr.isatty(),
                                    rank_weight=_rank_loss_weight(args), router_hint=args.router_hint,
                                    norm_gain=args.norm_gain, context=args.prev_context,
                                    cross_token=args.cross_token, peek=args.attention_peek,
                                    expert_rank=_expert_rank(args, model.config.num_local_experts),
                                    cross_heads=_cross_heads(args))
    after = report["heldout_after"]["recall"]
    meta = {"fingerprint": model_fingerprint(model.model), "model": str(model.path),
            "tokens_seen": report["train_tokens"] * args.epochs, "heldout_recall": after,
            "train_seconds": report["train_seconds"]}
    acc.save(args.out, meta)
    write_json_atomic(args.out + ".json", report)
    print(f"held-out recall@d (fraction of the true top-{model.config.num_experts_per_tok} found), "
          f"{report['heldout_tokens']} tokens:")
    cols = list(after["m2r2"])  # "d{d}" within the token, "d{d}-later" (cross-token rows)
    print("| predictor | " + " | ".join(f"{c} top-k | {c} top-(k+1)" for c in cols) + " |")
    print("|---|" + "---|---|" * len(cols))
    for name in ("next-gate", "next-gate-normed", "m2r2", "repeat"):
        if name not in after:
            continue
        cells = [f"{after[name][c]['top_k']:.3f} | {after[name][c]['top_k_plus_1']:.3f}" if c in after[name] else "- | -"
                 for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"held-out adapter loss {report['heldout_before']['loss']:.4f} -> {report['heldout_after']['loss']:.4f}; "
          f"{report['train_seconds']:.0f} s; wrote {args.out} and {args.out}.json")
    return 0 if draft_exit is None else _train_draft(args, model, ids, window, draft_exit)


def _expert_rank(args: argparse.Namespace, num_experts: int) -> int:
    """--expert-rank: auto = 512 // experts within 4..64; 0 without --attention-peek."""
    if not args.attention_peek:
        return 0
    return max(4, min(64, 512 // num_experts)) if args.expert_rank == "auto" else args.expert_rank


def _cross_heads(args: argparse.Namespace) -> bool:
    """--cross-heads: on by default with --cross-token; asked for without it is an error."""
    from .errors import MoeOffloadError

    if args.cross_heads and not args.cross_token:
        raise MoeOffloadError("--cross-heads shapes the rows past the last layer, which only --cross-token trains; "
                              "add --cross-token or drop --cross-heads")
    return args.cross_token and args.cross_heads is not False


def _rank_loss_weight(args: argparse.Namespace) -> float:
    """--rank-loss-weight, or its default for the adapter form: 0 with attention peek, 1 without."""
    if args.rank_loss_weight is not None:
        return args.rank_loss_weight
    return 0.0 if args.attention_peek else 1.0


def _draft_exit(value: str | None) -> int | str | None:
    from .errors import MoeOffloadError

    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise MoeOffloadError(f"--draft-exit must be auto or a layer number, got {value!r}") from None


def _train_draft(args: argparse.Namespace, model: Any, ids: list[int], window: int, exit_layer: int | str) -> int:
    """Train the speculative-decoding draft head and add it to args.out (keeping the prefetch adapters)."""
    from .errors import MoeOffloadError
    from .predict.draft import train_draft, write_draft
    from .results import write_json_atomic

    from pathlib import Path

    if not Path(args.out).is_file():
        raise MoeOffloadError(f"{args.out}: --draft-only adds a draft head to an existing adapter file; none is there")
    head, report = train_draft(model.model, ids, exit_layer=exit_layer, rank=args.draft_rank, epochs=args.epochs,
                               lr=args.lr, window=window, heldout_fraction=args.heldout_fraction, seed=args.seed,
                               show_progress=sys.stderr.isatty())
    write_draft(args.out, head, model.model, {"model": str(model.path), "train_seconds": report["train_seconds"]})
    write_json_atomic(args.out + ".draft.json", report)
    print(f"draft head at exit layer {report['exit_layer']}: held-out greedy agreement "
          + ", ".join(f"m={m} {c['heldout_greedy_agreement']:.3f}" for m, c in report["candidates"].items())
          + f"; {report['train_seconds']:.0f} s; added to {args.out} (report {args.out}.draft.json)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .predict import model_fingerprint
    from .predict.predictors import NEXT_GATE_VARIANT
    from .runtime import load
    from .analysis.trace import record_with_predictions, save_trace

    _check_outputs(args, "--out")
    model = load(args.model, **_runtime_kwargs(args))
    ids = model.encode_text(_read_text(args.text))[: args.max_tokens]
    trace = record_with_predictions(model.model, ids, model.runtime.max_seq_len, args.lookahead, args.accelerator,
                                    show_progress=sys.stderr.isatty())
    d = max(trace.meta["lookaheads"].values())
    meta = {**(trace.meta or {}), "fingerprint": model_fingerprint(model.model), "model": str(model.path),
            "text": args.text, "tokens": len(ids), "lookahead": d, "accelerator": args.accelerator,
            "next_gate_variant": NEXT_GATE_VARIANT}
    out = save_trace(args.out, trace, meta)
    print(f"wrote {out}: {len(ids)} tokens, {model.config.num_hidden_layers} layers, predictions "
          + ", ".join(f"{name} (lookahead {la})" for name, la in sorted(trace.meta["lookaheads"].items())))
    from .analysis.bench import trace_recall

    for name, cells in trace_recall(trace).items():
        print(f"  recall {name:20s} " + "  ".join(f"{k}: {v['top_k']:.3f} (top-k+1 {v['top_k_plus_1']:.3f})"
                                                  for k, v in cells.items()))
    return 0


def _capacities(spec: str, num_experts: int) -> list[int]:
    try:
        values = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) > num_experts:
        raise MoeOffloadError(f"--capacities must be a comma list of slots per layer in [1, {num_experts}], got {spec!r}")
    return values


def _check_outputs(args: argparse.Namespace, *flags: str) -> None:
    """Output paths checked (their folder created) before any long work starts."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if isinstance(value, str):
            output_file(value, flag)


def cmd_bench(args: argparse.Namespace) -> int:
    from .analysis.bench import bench_cache, markdown_table, model_config, plot, predictor_seconds
    from .results import result_metadata, write_json_atomic
    from .runtime import bundled_accelerator_path, bundled_heldout_text, bundled_model_path, load
    from .analysis.sim import StepCosts, get_hardware
    from .analysis.trace import trace_prefix, load_trace, record_with_predictions

    _check_outputs(args, "--json", "--plot")
    if args.capacities:
        _capacities(args.capacities, 1 << 30)  # the format now; the range once the trace is known
    hw = get_hardware(args.hardware)
    costs = StepCosts.for_model(model_config(args.link_model), hw, args.expert_dtype)
    if args.trace:
        trace = trace_prefix(load_trace(args.trace), args.max_tokens)
    else:
        model = load(args.model, device="cpu", offload=False)
        acc = args.accelerator
        wants_m2r2 = args.predictors is None or "m2r2" in args.predictors.split(",")
        if acc is None and args.model is None and bundled_accelerator_path().is_file() and wants_m2r2:
            acc = str(bundled_accelerator_path())
        ids = model.encode_text(_read_text(args.text or str(bundled_heldout_text())))[: args.max_tokens]
        trace = record_with_predictions(model.model, ids, model.runtime.max_seq_len, max(args.lookahead, 1), acc,
                                        show_progress=sys.stderr.isatty())
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2]
    per_layer = _capacities(args.capacities, E) if args.capacities else list(range(1, E + 1))
    predictors = args.predictors.split(",") if args.predictors else ["none", "next-gate"] + (
        ["m2r2"] if trace.preds and "m2r2" in trace.preds else [])
    chunk, cpu = _link_settings(args)
    lane = cpu.lane_costs(costs, args.expert_dtype, chunk) if cpu is not None else None
    m2r2_cost = predictor_seconds(trace, "m2r2", args.lookahead, costs, model_config(args.link_model), hw)
    rows = bench_cache(trace, [c * L for c in per_layer], args.policies.split(","), predictors, costs,
                       args.lookahead, args.prefetch_margin, args.prefetch_window, chunk, lane, args.rank_depth,
                       {"m2r2": m2r2_cost} if m2r2_cost is not None else None)
    print(f"{T} tokens, {L} layers x {E} experts, top-{k}; on-time hits: {args.link_model} {args.expert_dtype} "
          f"experts over {hw.name} ({costs.copy * 1e3:.2f} ms per copy); MB/token in those expert sizes\n")
    print(markdown_table(rows))
    settings = {"model": args.model or str(bundled_model_path()), "text": args.text, "trace": args.trace,
                "tokens": T, "layers": L, "experts": E, "top_k": k, "lookahead": args.lookahead,
                "prefetch_margin": args.prefetch_margin, "prefetch_window": args.prefetch_window,
                "rank_depth": args.rank_depth, "hardware": hw.key, "link_model": args.link_model,
                "expert_dtype": args.expert_dtype, "expert_bytes": costs.expert_bytes,
                "link_chunk_bytes": chunk, "cpu": args.cpu,
                "bounds": {"belady": "policy belady, predictor none", "oracle": "policy predictive, predictor oracle",
                           "deep-oracle": "policy belady, predictor deep-oracle (16 layers ahead across tokens, "
                                          "2 in flight)"}}
    if args.json:
        print(f"wrote {write_json_atomic(args.json, {**result_metadata('cpu'), 'settings': settings, 'results': rows})}")
    if args.plot:
        title = (f"{T} tokens, {L} layers x {E} experts; on time: {args.link_model} {args.expert_dtype} over "
                 f"{hw.name}, chunk {args.link_chunk_mb:g} MiB, cpu {args.cpu}")
        print(f"wrote {args.plot}" if plot(rows, args.plot, title) else "no plot: matplotlib is not installed (pip install matplotlib)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .analysis.bench import model_config, simulate
    from .analysis.sim import get_hardware, get_impl
    from .analysis.trace import trace_prefix, load_trace

    chunk, cpu = _link_settings(args)
    p = simulate(trace_prefix(load_trace(args.trace), args.max_tokens), model_config(args.model_config), get_hardware(args.hardware),
                 args.expert_dtype, args.capacity, args.predictor, args.policy, args.bookkeeping_us, args.lookahead,
                 args.prefetch_margin, args.prefetch_window, chunk, cpu, get_impl(args.implementation),
                 rank_depth=args.rank_depth)
    if args.json:
        from .results import result_metadata

        print(json.dumps({**result_metadata("cpu"), "tokens_per_second": p.tokens_per_second,
                          "per_token_seconds": p.per_token, "limits": p.limits, "settings": p.settings}, indent=2))
        return 0
    s, t = p.settings, p.per_token
    print(f"{s['hardware_name']}: {args.model_config}, {s['expert_dtype']} experts "
          f"({s['expert_bytes'] / 1e6:.0f} MB, {s['copy_ms']:.2f} ms per copy), {s['slots_model']} slots "
          f"({s['slots_per_layer']:.1f} per layer), {s['policy']} + {s['predictor']}")
    print(f"  projected      {p.tokens_per_second:7.2f} tokens/s   (hit rate {s['hit_rate']:.3f}, on time "
          f"{s['on_time_hit_rate']:.3f}; {s['on_time_share_of_hits']:.3f} of hits on time; CPU-computed experts "
          f"per token {s['cpu_experts_per_token']:.2f}; implementation {s['implementation']})")
    print(f"  per token      {t['total'] * 1e3:7.1f} ms = compute {t['compute'] * 1e3:.1f} + exposed copy "
          f"{t['exposed_copy'] * 1e3:.1f} + bookkeeping {t['bookkeeping'] * 1e3:.1f}"
          + (f" + waiting for the CPU lane {t['cpu_wait'] * 1e3:.1f}" if t.get("cpu_wait") else ""))
    print(f"  limits         all experts resident {p.limits['all_resident_tokens_per_second']:.2f} tokens/s; "
          f"link-bound with Belady hits {p.limits['link_bound_belady_tokens_per_second']:.2f} tokens/s; "
          f"deep oracle {p.limits['deep_oracle_tokens_per_second']:.2f} tokens/s "
          f"(on time {p.limits['deep_oracle_on_time_hit_rate']:.3f})")
    print(f"  (trace: {s['trace_tokens']} tokens x {s['trace_layers']} layers, scaled to {s['model_layers']} layers)")
    if s["predictor"] == "m2r2":
        print(f"  (m2r2 itself: {s['predictor_ms_per_token']:.2f} ms per token of device time, in compute)" if s["predictor_charged"]
              else "  (m2r2 itself is not charged: the trace does not record the adapters' form; record it again "
                   "with `moe-offload trace --accelerator FILE`)")
    if (s["trace_experts"], s["trace_top_k"]) != (s["model_experts"], s["model_top_k"]):
        print(f"  (trace routes top-{s['trace_top_k']} of {s['trace_experts']} experts per layer, the model top-"
              f"{s['model_top_k']} of {s['model_experts']}: the trace's residency share is kept, "
              f"{s['slots_simulated']} slots over {s['trace_layers']} traced layers)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .runtime import load
    from .serve import ServeConfig, create_app

    key = args.api_key if args.api_key is not None else os.environ.get("MOE_OFFLOAD_API_KEY") or None
    cfg = ServeConfig(model_id=args.model_id, max_batch=args.max_batch, api_key=key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"moe-offload: warning: serving on {args.host} without an API key: anyone who can reach this "
              "address can use the model (pass --api-key or set MOE_OFFLOAD_API_KEY)", file=sys.stderr)
    model = load(args.model, **_runtime_kwargs(args))
    uvicorn.run(create_app(model, cfg), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import resource
    import time

    from .quant.export import quantize_checkpoint
    from .runtime import bundled_model_path

    t0 = time.perf_counter()
    s = quantize_checkpoint(args.model or bundled_model_path(), args.out, args.expert_dtype, args.group_size,
                            force=args.force, show_progress=sys.stderr.isatty())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    print(f"wrote {s['out']}: {args.expert_dtype} experts"
          + (f" (groups of {s['group_size']})" if s["group_size"] else "")
          + f", {s['bytes'] / 1e6:.1f} MB in {s['shards']} shards, {time.perf_counter() - t0:.1f} s, "
            f"peak RSS {peak / 1e6:.0f} MB")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe, format_info

    plan_kw = None
    if args.device != "auto" or any(v is not None for v in (args.cache_experts, args.cache_per_layer, args.cache_gb)):
        plan_kw = _runtime_kwargs(args)
    info = describe(args.model, args.config, plan_kw)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    head, rest = lines[0] if lines else type(exc).__name__, lines[1:]
    if len(rest) > MAX_PROBLEM_LINES:
        rest = rest[:MAX_PROBLEM_LINES] + [f"... and {len(rest) - MAX_PROBLEM_LINES} more"]
    return head + (" " + "; ".join(rest) if rest else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "info": cmd_info, "train-accelerator": cmd_train_accelerator,
                "trace": cmd_trace, "bench": cmd_bench, "simulate": cmd_simulate,
                "quantize": cmd_quantize, "serve": cmd_serve}[args.command](args)
    except MoeOffloadError as exc:
        print(f"moe-offload: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-offload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
