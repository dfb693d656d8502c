"""The `moe-offload` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn, Sequence

from .errors import MoeOffloadError
from .options import (CPU_ACTIVATIONS, CPU_EXPERTS, DENSE_DTYPES, DTYPE_NAMES, EXPERT_DTYPES, FLAG_FIELDS, PREDICTORS,
                      TOP_FIELDS, TUNING_FIELDS, OffloadConfig, parse_tuning, tuning_help)
from .validate import SEED_MAX, float_arg, int_arg, output_file

MAX_PROBLEM_LINES = 20
DRAFT_RANK = 64  # the draft head's rank (the bundled head's)
HELDOUT_FRACTION = 0.1  # tail of a training text held out for the recall report
BOOKKEEPING_US = 20.0  # simulated host work per layer (benchmarks/bookkeeping.py measures 10-20 us)
POS = int_arg(1)  # argparse types (validate.py): the error names the flag
NONNEG = int_arg(0)
SEED = int_arg(0, SEED_MAX)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read more, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face MoE folder (config.json, *.safetensors, tokenizer.json); "
                        "default: the bundled tiny model")


def _add_text_args(p: argparse.ArgumentParser, out_metavar: str, out_help: str) -> None:
    """--model, --text, --out and --max-tokens of the commands that run a model over a text."""
    _add_model_args(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text (paragraphs split by blank lines)")
    p.add_argument("--out", required=True, metavar=out_metavar, help=out_help)
    p.add_argument("--max-tokens", type=POS, default=None, metavar="N", help="use at most N tokens of the text")


def _field_help(name: str) -> str:
    return TOP_FIELDS[name].metadata["help"]


def _add_runtime_args(p: argparse.ArgumentParser, kind: str = "full") -> None:
    """The runtime flags, one per OffloadConfig field in options.FLAG_FIELDS, plus --tuning for the rest.
    kind "full": all of them; "plan": what a memory plan reads (device, dtype, expert storage, budget);
    "light": --device, --dtype and --tuning, for the research commands."""
    g = p.add_argument_group("runtime (moe_offload.OffloadConfig; the rest through --tuning)")
    g.add_argument("--device", default=None, help=_field_help("device") + " (default auto)")
    g.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES), help=_field_help("dtype"))
    if kind != "light":
        _add_cache_args(g, kind == "full")
    g.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting (repeatable), or a JSON file of them; `--tuning help` lists them "
                        "with defaults and ranges")
    p.set_defaults(runtime_flags=[a.dest for a in g._group_actions], runtime_kind=kind)


def _add_cache_args(g: Any, full: bool) -> None:
    g.add_argument("--expert-dtype", default=None, choices=list(EXPERT_DTYPES), help=_field_help("expert_dtype"))
    g.add_argument("--cache-per-layer", type=POS, default=None, metavar="K", help=_field_help("cache_per_layer"))
    g.add_argument("--cache-gb", type=float_arg(0, lo_open=True), default=None, metavar="X",
                   help=_field_help("cache_gb"))
    if not full:
        return
    o = g.add_mutually_exclusive_group()
    o.add_argument("--offload", dest="offload", action="store_const", const=True, default=None,
                   help=_field_help("offload"))
    o.add_argument("--no-offload", dest="offload", action="store_const", const=False,
                   help="keep every expert on the device (no cache; the exactness reference)")
    g.add_argument("--predictor", default=None, choices=list(PREDICTORS), help=_field_help("predictor"))
    g.add_argument("--accelerator", default=None, metavar="FILE", help=_field_help("accelerator"))
    g.add_argument("--cpu-experts", default=None, choices=list(CPU_EXPERTS), help=_field_help("cpu_experts"))
    g.add_argument("--threads", type=POS, default=None, metavar="N", help=_field_help("threads"))
    g.add_argument("--dense-dtype", default=None, choices=list(DENSE_DTYPES), help=_field_help("dense_dtype"))
    g.add_argument("--cpu-activations", default=None, choices=list(CPU_ACTIVATIONS),
                   help=_field_help("cpu_activations"))


# The settings a command reads, by its runtime-flag kind ("full" reads them all): any other is refused
# rather than ignored.
_PLAN_KEYS = {"device", "dtype", "expert_dtype", "cache_per_layer", "cache_gb", "cache_experts", "policy",
              "group_size", "max_seq_len"}
_READS = {"plan": _PLAN_KEYS,
          "light": _PLAN_KEYS | {"offload", "cpu_experts", "link_chunk_mb", "moe_backend", "show_progress", "threads",
                                 "cpu_activations"}}


def offload_config(args: argparse.Namespace, **fixed: Any) -> OffloadConfig:
    """The OffloadConfig the runtime flags and --tuning items ask for (a flag and a --tuning item may not
    both set the same field; a setting the command does not read is refused)."""
    settings = parse_tuning(args.tuning)
    reads = _READS.get(args.runtime_kind)
    unread = sorted(set(settings) - reads) if reads is not None else []
    if unread:
        raise MoeOffloadError(f"--tuning {', '.join(unread)}: not read by `moe-offload {args.command}`; drop "
                              f"{'it' if len(unread) == 1 else 'them'} (it reads {', '.join(sorted(reads))})")
    dests = {flag[2:].replace("-", "_"): field for flag, field in FLAG_FIELDS.items()} | {"offload": "offload"}
    flags = {dests[d]: getattr(args, d) for d in args.runtime_flags if d in dests and getattr(args, d) is not None}
    if getattr(args, "speculative", False):
        flags["speculative"] = True  # generate's own --speculative flag
    both = sorted(set(flags) & set(settings))
    if both:
        raise MoeOffloadError(f"{', '.join(both)} given both as a flag and in --tuning; give it once")
    if "show_progress" not in settings:
        settings["show_progress"] = sys.stderr.isatty()
    return OffloadConfig.make(**{**settings, **flags, **fixed})


def _add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", default="none", metavar="PROFILE",
                   help="CPU lane: compute a missed expert on this CPU profile (assets/cpu_profiles.json: "
                        "ci-epyc-2core, desktop-ddr4-2ch, desktop-ddr5-2ch) when that beats its copy; none = off")


def _link_settings(args: argparse.Namespace):
    """(link chunk bytes, CPU-lane profile). This runtime's link moves 8 MiB chunks, demand first; a
    reference implementation (simulate --implementation, fitted to published numbers) moves whole
    experts in issue order, as mixtral-offloading does (None)."""
    from .analysis.sim import IMPL_THIS, get_cpu
    from .offload.link import DEFAULT_CHUNK_BYTES

    ours = getattr(args, "implementation", IMPL_THIS.key) == IMPL_THIS.key
    return DEFAULT_CHUNK_BYTES if ours else None, (get_cpu(args.cpu) if args.cpu != "none" else None)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="moe-offload",
        description="Run Mixture-of-Experts models with experts offloaded to host RAM, a device expert cache "
                    "and predictive prefetch.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate text. Streams the new text to stdout and a one-line summary "
                                   "to stderr; with --json prints one JSON object instead.")
    _add_model_args(g)
    g.add_argument("--prompt", default="In the beginning", help="prompt text (default: %(default)r)")
    g.add_argument("--max-new-tokens", type=NONNEG, default=64, metavar="N", help="default %(default)s")
    g.add_argument("--temperature", type=float_arg(0), default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float_arg(0, 1, lo_open=True), default=1.0, metavar="P",
                   help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=SEED, default=None, metavar="S", help="sampling seed (reproducible output)")
    g.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding: draft tokens with the adapter file's draft head (--accelerator, "
                        "or the bundled one) and verify them in one pass; output is exactly that of plain decoding")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, prompt_token_ids, stats, seconds, "
                        "tokens_per_second, finish_reason")
    _add_runtime_args(g)

    t = sub.add_parser("train-accelerator", help="train M2R2 accelerator adapters for a model",
                       description="Run the frozen model over a text (offloaded when it does not fit; many "
                                   "tokens per expert load) and train low-rank adapters that predict the router "
                                   "choices of layers l+d from layer l. Reports held-out recall@d of next-gate "
                                   "and m2r2 at the end.")
    _add_text_args(t, "FILE.safetensors", "adapter file to write")
    t.add_argument("--lookahead", dest="lookaheads", default="1,2,3",
                   help="lookaheads d to train adapters for, comma list (default 1,2,3)")
    t.add_argument("--rank", type=POS, default=32, help="adapter rank R (default 32)")
    t.add_argument("--epochs", type=POS, default=4, help="passes over the training split (default 4)")
    t.add_argument("--lr", type=float_arg(0, lo_open=True), default=3e-3, help="learning rate (default 3e-3)")
    t.add_argument("--window", type=int_arg(2), default=256, help="tokens per forward window (default 256)")
    t.add_argument("--seed", type=SEED, default=0, help="adapter initialisation and window order (default 0)")
    t.add_argument("--attention-peek", action="store_true",
                   help="within-token predictions run through the real attention of the layers they pass and "
                        "low-rank stand-ins of their experts (higher recall: 0.96/0.95/0.95 at d=1/2/3 on the "
                        "bundled model against 0.89/0.86/0.84; but one extra attention per predicted layer at "
                        "decode, which measured a loss of 5-15%% of tokens/s with the CPU lane and under 1%% gain "
                        "without it in the Mixtral-8x7B int4 projection, lab/README.md; default off)")
    t.add_argument("--cross-token", action="store_true",
                   help="also train rows that predict the next token's layers (lookaheads past the last layer), so "
                        "prefetch plans reach across the token boundary (give lookaheads up to 2L; measured best "
                        "with --tuning policy=predictive)")
    t.add_argument("--draft-exit", default=None, metavar="auto|M",
                   help="also train a draft head for --speculative at exit layer M (auto: the layer with the best "
                        "expected speedup on held-out text) into the same file")
    t.add_argument("--draft-only", action="store_true",
                   help="with --draft-exit: add or replace only the draft head in the existing --out file")
    _add_runtime_args(t, "light")

    r = sub.add_parser("trace", help="record routing (and predictions) over a text to .npz",
                       description="Record decode-order routing of a text (teacher forcing, chunked prefill): "
                                   "routed_ids, routed_weights, router_probs, pred_next_gate and, with "
                                   "--accelerator, pred_m2r2; plus token_ids and a JSON meta string.")
    _add_text_args(r, "FILE.npz", "trace file to write")
    r.add_argument("--accelerator", default=None, metavar="FILE", help="also record m2r2 predictions")
    r.add_argument("--lookahead", type=POS, default=None, metavar="D",
                   help="lookahead of the recorded predictions (default 3; m2r2 from cross-token adapters: their whole "
                        "range). Past the --accelerator's range it is refused")
    _add_runtime_args(r, "light")

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
    bc.add_argument("--policies", default="lru,lru-layer,lfu,predictive",
                    help="eviction policies, comma list (default %(default)s)")
    bc.add_argument("--predictors", default=None, help="default: none,next-gate and m2r2 when the trace has it")
    bc.add_argument("--lookahead", type=POS, default=2, metavar="D", help="layers ahead the prefetcher plans (default 2)")
    bc.add_argument("--prefetch-margin", type=NONNEG, default=0, metavar="M",
                    help="prefetch top-(k + M) experts per predicted layer (default 0)")
    bc.add_argument("--hardware", default="rtx4090-pcie4", help="link model for on-time hits (default %(default)s)")
    bc.add_argument("--link-model", default="mixtral-8x7b", help="model whose expert sizes the link moves (default %(default)s)")
    bc.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp16", "int8", "int4", "int3", "int2"],
                    help="expert format whose byte size (moe_offload.formats) the link moves (default bf16)")
    _add_link_args(bc)
    bc.add_argument("--json", default=None, metavar="OUT", help="write the results JSON here")
    bc.add_argument("--plot", default=None, metavar="OUT.png", help="hit rate vs capacity (needs matplotlib)")

    sm = sub.add_parser("simulate", help="project decode tokens/s on hardware we do not have, from a trace",
                        description="Event-driven timeline (one compute stream, one copy stream) driven by a real "
                                    "routing trace; compute from bytes/bandwidth and flops/throughput, copies from "
                                    "link bandwidth and latency, prefetches from the recorded predictions.")
    sm.add_argument("--trace", required=True, metavar="FILE", help="from `moe-offload trace`")
    sm.add_argument("--hardware", required=True, help="one of: h100-pcie5, a100-pcie4, rtx5090-pcie5, rtx4090-pcie4, "
                    "rtx3090-pcie4, rtx3060-pcie3, rtx3080m-pcie4, t4-pcie3")
    sm.add_argument("--model-config", default="mixtral-8x7b", help="mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, qwen3-235b-a22b, olmoe-1b-7b, deepseek-v3, glm-4.5-air, gpt-oss-20b, gpt-oss-120b (published configs, shipped) or a hub config.json")
    sm.add_argument("--expert-dtype", default="bf16", choices=["bf16", "int8", "int4", "int3", "int2", "q4_k_m", "fp8", "mxfp4"],
                    help="expert storage; int3/int2 approximate the mixtral-offloading report's HQQ experts; q4_k_m (llama.cpp's "
                         "Q4_K / Q6_K mix per layer), fp8 (e4m3, 128 x 128 block scales) and mxfp4 are shipped formats, "
                         "their true bytes per expert, with the dense weights as such files hold them")
    sm.add_argument("--capacity", type=POS, default=None, help="expert slots of the real model (default: what fits)")
    sm.add_argument("--predictor", default="next-gate", help="none, next-gate, m2r2 (if in the trace), oracle or "
                    "deep-oracle (perfect knowledge 16 layers ahead, across tokens)")
    sm.add_argument("--policy", default="lru", help="eviction policy: lru (default), lru-layer, lfu, predictive, belady")
    sm.add_argument("--lookahead", type=POS, default=None, metavar="D",
                    help="layers ahead the prefetcher plans (default: the trace's recorded lookahead)")
    sm.add_argument("--prefetch-margin", type=NONNEG, default=0, metavar="M",
                    help="prefetch top-(k + M) experts per predicted layer (default 0)")
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
                    help="int8: symmetric, one scale per output row; int4: symmetric, one scale per group of "
                         "--group-size (compressed-tensors' rule). transformers 5.25+ with compressed-tensors loads "
                         "both folders (tested); vLLM's compressed-tensors W8A16/W4A16 MoE path reads the same "
                         "symmetric layout (not tested here). transformers cannot load asymmetric int4 (zero points)")
    qz.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                    help="int4 group size along the input dimension (default 128)")
    qz.add_argument("--force", action="store_true", help="replace a non-empty --out folder")

    i = sub.add_parser("info", help="model config, parameter counts, bytes per expert, memory plan",
                       description="Describe a checkpoint without loading its weights (headers only). "
                                   "With --device or a cache budget, also print the memory plan "
                                   "(dense weights, KV cache, expert slots, reserve).")
    _add_model_args(i)
    _add_runtime_args(i, "plan")
    i.add_argument("--config", metavar="FILE", default=None,
                   help="describe a bare config.json instead of a model folder (no weights needed)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _offload_choice(model: Any, asked: bool | None) -> str:
    dev = model.runtime.device.type
    if asked is not None:
        why = "asked"
    elif model.expert_cache is not None and dev == "cpu":  # on cpu a cache or prefetch setting turns it on
        why = "set by " + ", ".join(model.offload_config.cache_options())
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

    model = load(args.model, offload_config(args, speculative=True) if args.speculative else offload_config(args))
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
          f"{_offload_choice(model, model.offload_config.offload)}]", file=sys.stderr)
    if (model.runtime.expert_format in ("int8", "int4", "int4-asym") and model.runtime.device.type == "cpu"
            and str(model.runtime.dtype) == "torch.float32"):  # the formats with PyTorch weight-only CPU ops
        print(f"[note: {model.runtime.expert_format} experts run fast on the CPU only at --dtype bfloat16: PyTorch's "
              "weight-only kernels have no fast float32 path (benchmarks/cpu_quant.py: 734M model, 2 threads, int4 "
              "7 tok/s at float32, 144 at bfloat16)]", file=sys.stderr)
    if res.stats.get("offload"):
        st = res.stats
        print(f"[expert cache: {st['capacity_slots']} slots, {st['policy']}: {st['uses']} uses, {st['hits']} hits, "
              f"{st['misses']} misses ({100 * st['hit_rate']:.1f}% hit rate), {st['bytes_h2d'] / 1e6:.1f} MB "
              f"copied, {st['stall_seconds'] * 1e3:.1f} ms stalled]", file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    from .errors import MoeOffloadError

    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeOffloadError(f"{path}: cannot read the text: {exc}") from None


def _text_ids(model: Any, path: str, max_tokens: int | None) -> list[int]:
    """The token ids of a text file (at most max_tokens); an empty text is an error naming the file."""
    ids = model.encode_text(_read_text(path))[:max_tokens]
    if not ids:
        raise MoeOffloadError(f"{path}: the text has no tokens; give a UTF-8 text file with some content")
    return ids


def _replayable(trace: Any, path: str) -> Any:
    """A loaded trace with at least one token (an empty one has nothing to replay)."""
    if len(trace.token_ids) == 0:
        raise MoeOffloadError(f"{path}: the trace holds no tokens; record one from a non-empty text with "
                              "`moe-offload trace`")
    return trace


def _lookaheads(spec: str) -> list[int]:
    from .errors import MoeOffloadError

    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise MoeOffloadError(f"--lookahead must be a comma list of positive integers, got {spec!r}")
    return values


def cmd_train_accelerator(args: argparse.Namespace) -> int:
    from .errors import MoeOffloadError
    from .predict.accelerator import model_fingerprint
    from .predict.train import train_accelerator
    from .results import write_json_atomic
    from .runtime import load

    lookaheads = _lookaheads(args.lookaheads)
    draft_exit = _draft_exit(args.draft_exit)
    if args.draft_only and draft_exit is None:
        raise MoeOffloadError("--draft-only needs --draft-exit auto|M")
    _check_outputs(args, "--out")
    if args.draft_only and not os.path.isfile(args.out):
        raise MoeOffloadError(f"{args.out}: --draft-only adds a draft head to an existing adapter file; none is there")
    model = load(args.model, offload_config(args, predictor="none"))
    _check_training_ranges(lookaheads, draft_exit, args.cross_token, model.config.num_moe_layers,
                           model.config.num_hidden_layers)
    ids = _text_ids(model, args.text, args.max_tokens)
    window = min(args.window, model.runtime.max_seq_len)
    if len(ids) < 4 * window:
        raise MoeOffloadError(f"{args.text}: {len(ids)} tokens is too little text; need at least {4 * window}")
    if args.draft_only:
        return _train_draft(args, model, ids, window, draft_exit)
    acc, report = train_accelerator(model.model, ids, lookaheads=lookaheads, rank=args.rank, epochs=args.epochs,
                                    lr=args.lr, window=window, heldout_fraction=HELDOUT_FRACTION,
                                    seed=args.seed, show_progress=sys.stderr.isatty(),
                                    cross_token=args.cross_token, peek=args.attention_peek)
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


def _check_training_ranges(lookaheads: list[int], draft_exit: int | str | None, cross_token: bool,
                           moe_layers: int, layers: int) -> None:
    """--lookahead and --draft-exit against the model, before any training."""
    top = 2 * moe_layers if cross_token else moe_layers - 1
    if max(lookaheads) > top:
        raise MoeOffloadError(f"--lookahead {max(lookaheads)} is past this model's range: at most {top} "
                              + ("(twice its MoE layers, with --cross-token)" if cross_token else
                                 f"within a token of {moe_layers} MoE layers (add --cross-token to predict the "
                                 "next token's layers)"))
    if isinstance(draft_exit, int) and not 1 <= draft_exit < layers:
        raise MoeOffloadError(f"--draft-exit must be auto or a layer in [1, {layers - 1}], got {draft_exit}")


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
    head, report = train_draft(model.model, ids, exit_layer=exit_layer, rank=DRAFT_RANK, epochs=args.epochs,
                               lr=args.lr, window=window, heldout_fraction=HELDOUT_FRACTION, seed=args.seed,
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
    model = load(args.model, offload_config(args, predictor="none"))
    L = model.config.num_moe_layers
    if args.lookahead is not None and args.accelerator is None and args.lookahead >= L:
        raise MoeOffloadError(f"--lookahead {args.lookahead}: next-gate predicts within a token, at most {L - 1} "
                              f"layers ahead on this {L}-layer model (cross-token m2r2 adapters reach further: "
                              "--accelerator FILE)")
    ids = _text_ids(model, args.text, args.max_tokens)
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


def _capacities(spec: str, num_experts: int | None) -> list[int]:
    """--capacities: a comma list of slots per layer, each in [1, experts] (experts None: not known yet)."""
    try:
        values = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (num_experts is not None and max(values) > num_experts):
        limit = f"[1, {num_experts}]" if num_experts is not None else ">= 1"
        raise MoeOffloadError(f"--capacities must be a comma list of slots per layer {limit}, got {spec!r}")
    return values


def _check_outputs(args: argparse.Namespace, *flags: str) -> None:
    """Output paths checked (their folder created) before any long work starts."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if isinstance(value, str):
            output_file(value, flag)


def cmd_bench(args: argparse.Namespace) -> int:
    from .analysis.bench import bench_cache, markdown_table, model_config, plot, predictor_seconds
    from .results import result_metadata, shown, write_json_atomic
    from .runtime import bundled_accelerator_path, bundled_heldout_text, bundled_model_path, load
    from .analysis.sim import StepCosts, get_hardware
    from .analysis.trace import trace_prefix, load_trace, record_with_predictions

    _check_outputs(args, "--json", "--plot")
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MoeOffloadError(f"--plot {args.plot}: needs matplotlib (pip install matplotlib, or the "
                                  "project's `plot` extra); nothing was run")
    if args.capacities:
        _capacities(args.capacities, None)  # the format now; the range once the trace is known
    hw = get_hardware(args.hardware)
    costs = StepCosts.for_model(model_config(args.link_model), hw, args.expert_dtype)
    if args.trace:
        trace = _replayable(trace_prefix(load_trace(args.trace), args.max_tokens), args.trace)
    else:
        model = load(args.model, device="cpu", offload=False)
        acc = args.accelerator
        wants_m2r2 = args.predictors is None or "m2r2" in args.predictors.split(",")
        if acc is None and args.model is None and bundled_accelerator_path().is_file() and wants_m2r2:
            acc = str(bundled_accelerator_path())
        ids = _text_ids(model, args.text or str(bundled_heldout_text()), args.max_tokens)
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
                       args.lookahead, args.prefetch_margin, 1, chunk, lane, None,
                       {"m2r2": m2r2_cost} if m2r2_cost is not None else None)
    print(f"{T} tokens, {L} layers x {E} experts, top-{k}; on-time hits: {args.link_model} {args.expert_dtype} "
          f"experts over {hw.name} ({costs.copy * 1e3:.2f} ms per copy); MB/token in those expert sizes\n")
    print(markdown_table(rows))
    settings = {"model": shown(args.model or str(bundled_model_path())), "text": args.text and shown(args.text), "trace": args.trace and shown(args.trace),
                "tokens": T, "layers": L, "experts": E, "top_k": k, "lookahead": args.lookahead,
                "prefetch_margin": args.prefetch_margin, "hardware": hw.key, "link_model": args.link_model,
                "expert_dtype": args.expert_dtype, "expert_bytes": costs.expert_bytes,
                "link_chunk_bytes": chunk, "cpu": args.cpu,
                "bounds": {"belady": "policy belady, predictor none", "oracle": "policy predictive, predictor oracle",
                           "deep-oracle": "policy belady, predictor deep-oracle (16 layers ahead across tokens, "
                                          "2 in flight)"}}
    if args.json:
        print(f"wrote {write_json_atomic(args.json, {**result_metadata('cpu'), 'settings': settings, 'results': rows})}")
    if args.plot:
        title = (f"{T} tokens, {L} layers x {E} experts; on time: {args.link_model} {args.expert_dtype} over "
                 f"{hw.name}, cpu {args.cpu}")
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .analysis.bench import model_config, simulate
    from .analysis.sim import get_hardware, get_impl
    from .analysis.trace import trace_prefix, load_trace

    from .analysis.projections import dense_bytes_per_param
    from .analysis.sim import SHIPPED_FORMATS

    chunk, cpu = _link_settings(args)
    dense = dense_bytes_per_param(args.expert_dtype) if args.expert_dtype in SHIPPED_FORMATS else None
    p = simulate(_replayable(trace_prefix(load_trace(args.trace), args.max_tokens), args.trace), model_config(args.model_config), get_hardware(args.hardware),
                 args.expert_dtype, args.capacity, args.predictor, args.policy, BOOKKEEPING_US, args.lookahead,
                 args.prefetch_margin, 1, chunk, cpu, get_impl(args.implementation), dense_bytes_per_param=dense)
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
    from .serve import ServeConfig, create_app, uvicorn_config

    key = args.api_key if args.api_key is not None else os.environ.get("MOE_OFFLOAD_API_KEY") or None
    cfg = ServeConfig(model_id=args.model_id, max_batch=args.max_batch, api_key=key)
    _check_address(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"moe-offload: warning: serving on {args.host} without an API key: anyone who can reach this "
              "address can use the model (pass --api-key or set MOE_OFFLOAD_API_KEY)", file=sys.stderr)
    config = offload_config(args)
    if config.speculative:
        raise MoeOffloadError("speculative: the server decodes requests in batches, which speculative decoding does "
                              "not (yet); drop --tuning speculative / draft_tokens / accelerator for it")
    model = load(args.model, config)
    _check_batch_memory(model, args.max_batch)
    uvicorn.Server(uvicorn_config(create_app(model, cfg), args.host, args.port, cfg.header_timeout_s,
                                  log_level="info")).run()
    return 0


def _check_address(host: str, port: int) -> None:
    """--host/--port can be bound (checked before the model loads, so the error is one line, not a log)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MoeOffloadError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise MoeOffloadError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick "
                                  "another port or stop what holds it") from None


def _check_batch_memory(model: Any, max_batch: int) -> None:
    """The batch's KV cache (max_batch rows of the context) must fit the device's free memory."""
    import psutil
    import torch

    kv = model.kv_cache
    need = max_batch * (kv.k.numel() + kv.v.numel()) * kv.k.element_size()
    dev = model.runtime.device
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else psutil.virtual_memory().available
    if need > 0.9 * free:
        raise MoeOffloadError(f"--max-batch {max_batch} needs {need / 1e9:.1f} GB of KV cache ({max_batch} x "
                              f"{model.runtime.max_seq_len} tokens) but {free / 1e9:.1f} GB is free on {dev}; "
                              "lower --max-batch or --tuning max_seq_len, or leave room beside the expert cache "
                              "(--cache-gb / --cache-per-layer; by default it fills the free device memory)")


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

    config = offload_config(args)
    given = args.tuning or any(getattr(args, d) is not None for d in args.runtime_flags if d != "tuning")
    plan_kw = config if given else None  # any runtime setting given: the memory plan it makes
    info = describe(args.model, args.config, plan_kw)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> NoReturn:
    """An unknown flag: the error names the subcommand's own --help and the closest flag it has."""
    import difflib

    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    if getattr(args, "bench_command", None):
        sub = sub._subparsers._group_actions[0].choices[args.bench_command]  # type: ignore[union-attr]
    flags = [o for a in sub._actions for o in a.option_strings]
    name = extra[0].split("=")[0]
    key = name.lstrip("-").replace("-", "_")
    if "--tuning" in flags and name.startswith("--") and key in TUNING_FIELDS | TOP_FIELDS:  # a setting without a flag
        sub.error(f"unrecognized arguments: {' '.join(extra)}; this setting is given as --tuning {key}=VALUE")
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else ""))


def _one_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    head, rest = lines[0] if lines else type(exc).__name__, lines[1:]
    if len(rest) > MAX_PROBLEM_LINES:
        rest = rest[:MAX_PROBLEM_LINES] + [f"... and {len(rest) - MAX_PROBLEM_LINES} more"]
    return head + (" " + "; ".join(rest) if rest else "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--tuning" and b == "help" for a, b in zip(argv, argv[1:])) or "--tuning=help" in argv:
        print(tuning_help())  # before the subcommand's required arguments are asked for
        return 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, args, extra)
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
