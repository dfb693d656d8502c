"""`moe-offload bench cache` and `moe-offload simulate`: replay a routing trace through the real cache,
policies and prefetcher on a simulated link (moe_offload.sim)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import MoeOffloadError
from ..offload.plan import device_reserve_bytes
from ..offload.cpu_lane import LaneCosts
from .sim import (IMPL_THIS, CpuProfile, Hardware, ImplParams, RecordedPredictor, StepCosts, TimelineResult,
                  run_timeline)
from .trace import RoutingTrace

MODEL_CONFIGS = {"mixtral-8x7b": "mixtral-8x7b-v0.1.config.json", "mixtral-8x22b": "mixtral-8x22b-v0.1.config.json",
                 "qwen3-30b-a3b": "qwen3-30b-a3b.config.json", "olmoe-1b-7b": "olmoe-1b-7b.config.json",
                 "deepseek-v3": "deepseek-v3.config.json", "glm-4.5-air": "glm-4.5-air.config.json",
                 "gpt-oss-20b": "gpt-oss-20b.config.json", "gpt-oss-120b": "gpt-oss-120b.config.json",
                 "qwen3-235b-a22b": "qwen3-235b-a22b.config.json"}
KV_TOKENS = 4096
# The deep-oracle bound: perfect knowledge of the future (the next DEEP_ORACLE_LOOKAHEAD layers, across
# token boundaries, and Belady eviction), prefetched with DEEP_ORACLE_WINDOW loads in flight on the same
# link. (Measured on the bundled trace, int4 on the RTX 4090 profile: window 2 beats 8, which congests
# the link, and 16 layers beat 2..12 at 2, 4 and 6 slots per layer.)
DEEP_ORACLE_LOOKAHEAD = 16
DEEP_ORACLE_WINDOW = 2
BOUNDS = {"belady": ("belady", "none"), "oracle": ("predictive", "oracle"), "deep-oracle": ("belady", "deep-oracle")}


def model_config(name_or_path: str) -> ModelConfig:
    if name_or_path in MODEL_CONFIGS:
        return ModelConfig.from_file(Path(str(resources.files("moe_offload") / "assets" / MODEL_CONFIGS[name_or_path])))
    if Path(name_or_path).is_file():
        return ModelConfig.from_file(name_or_path)
    raise MoeOffloadError(f"model config {name_or_path!r}: not one of {sorted(MODEL_CONFIGS)} nor a config.json file")


def predictor_from_trace(trace: RoutingTrace, name: str, lookahead: int | None = None) -> RecordedPredictor | None:
    """Recorded scores of `name` (none, next-gate, m2r2, oracle) as a replayable predictor."""
    if name == "none":
        return None
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2] if trace.router_probs is not None else int(trace.routed_ids.max()) + 1
    if name == "deep-oracle":
        return deep_oracle(trace, E, lookahead or DEEP_ORACLE_LOOKAHEAD)
    if name == "oracle":
        D = lookahead or 2
        truth = np.zeros((T, L, E), dtype=np.float32)
        np.put_along_axis(truth, trace.routed_ids.astype(np.int64), trace.routed_weights + 1.0, axis=2)
        preds = np.full((T, L, D, E), np.nan, dtype=np.float32)
        for d in range(1, min(D, L - 1) + 1):  # within the token (deep-oracle crosses tokens)
            preds[:, : L - d, d - 1] = truth[:, d:]
        return RecordedPredictor("oracle", preds, truth[:, :D].copy())
    key = name
    if not trace.preds or key not in trace.preds:
        have = sorted(trace.preds or {})
        raise MoeOffloadError(f"the trace has no {name!r} predictions (it has {have}); record them with "
                              "`moe-offload trace` (m2r2 needs --accelerator)")
    preds = trace.preds[key]
    if lookahead is not None:
        if lookahead > preds.shape[2]:
            raise MoeOffloadError(f"lookahead {lookahead} exceeds the trace's recorded lookahead {preds.shape[2]}")
        preds = preds[:, :, :lookahead]
    embed = trace.embed_preds[:, : preds.shape[2]] if trace.embed_preds is not None else None
    # cross-token adapters score rows past the last layer (the next token's layers); others leave them NaN
    cross = bool(np.isfinite(preds[:, L - 1, 0]).any())
    return RecordedPredictor(name, preds, embed, cross_token=cross)


def deep_oracle(trace: RoutingTrace, E: int, D: int) -> RecordedPredictor:
    """Perfect scores of the next D layers of the whole decode sequence (crossing into later tokens)."""
    T, L, _ = trace.routed_ids.shape
    truth = np.zeros((T * L + D, E), dtype=np.float32)  # [steps, E]: step t*L + l
    flat = trace.routed_ids.reshape(T * L, -1).astype(np.int64)
    np.put_along_axis(truth[: T * L], flat, trace.routed_weights.reshape(T * L, -1) + 1.0, axis=1)
    truth[T * L:] = np.nan  # past the end of the trace
    steps = np.arange(T * L)[:, None] + np.arange(1, D + 1)[None]  # [T*L, D]
    preds = truth[steps].reshape(T, L, D, E)
    embed = np.zeros((T, min(D, L), E), dtype=np.float32)
    np.put_along_axis(embed, trace.routed_ids[:, : min(D, L)].astype(np.int64), 1.0, axis=2)
    return RecordedPredictor("deep-oracle", preds, embed, cross_token=True)


def trace_recall(trace: RoutingTrace) -> dict[str, dict[str, dict[str, float]]]:
    """recall@d of each recorded predictor: the fraction of the true top-k experts of layer l+d found in
    the predictor's top-k (and top-(k+1)) computed at layer l, over all tokens and layers."""
    T, L, k = trace.routed_ids.shape
    ids = trace.routed_ids.astype(np.int64)  # [T, L, k]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, preds in (trace.preds or {}).items():
        out[name] = {}
        for d in range(1, preds.shape[2] + 1):
            # "d{d}": targets within the token (layer l+d); "d{d}-later": a cross-token predictor's rows
            # for a later token (layer (l+d) mod L of token t + (l+d) // L), where it scored them
            for later in (False, True):
                hits, total = {"top_k": 0, "top_k_plus_1": 0}, 0
                for l in range(L):
                    q, t = divmod(l + d, L)
                    if (q > 0) != later or T - q <= 0:
                        continue
                    scores = preds[: T - q, l, d - 1]  # [n, E], made at layer l of token i for (i + q, t)
                    if not np.isfinite(scores).all():
                        continue
                    order = np.argsort(-scores, axis=-1, kind="stable")
                    for label, m in (("top_k", k), ("top_k_plus_1", k + 1)):
                        hits[label] += int((ids[q:, t, :, None] == order[:, None, :m]).any(-1).sum())
                    total += (T - q) * k
                if total:
                    out[name][f"d{d}-later" if later else f"d{d}"] = {lab: h / total for lab, h in hits.items()}
    if trace.embed_preds is not None:  # a token's first layers, predicted from its embedding
        out["embedding-next-gate"] = {}
        for t in range(trace.embed_preds.shape[1]):
            order = np.argsort(-trace.embed_preds[:, t], axis=-1, kind="stable")  # [T, E]
            true = trace.routed_ids[:, t].astype(np.int64)  # [T, k]
            out["embedding-next-gate"][f"layer{t}"] = {
                label: float((true[:, :, None] == order[:, None, :m]).any(-1).mean())
                for label, m in (("top_k", k), ("top_k_plus_1", k + 1))}
    return out


def _row(policy: str, predictor: str, slots: int, L: int, res: TimelineResult) -> dict[str, Any]:
    st, T = res.stats, res.tokens
    return {"policy": policy, "predictor": predictor, "capacity": slots, "capacity_per_layer": slots / L,
            "hit_rate": st["hit_rate"], "on_time_hit_rate": (st["hits"] - st["late_hits"]) / st["uses"],
            "demand_misses_per_token": st["misses"] / T, "prefetch_hits": st["prefetch_hits"],
            "prefetch_wasted": st["prefetch_wasted"], "bytes_per_token": st["bytes_h2d"] / T,
            "uses": st["uses"], "hits": st["hits"], "misses": st["misses"], "cpu_experts": st["cpu_experts"]}


def bench_cache(trace: RoutingTrace, capacities: list[int], policies: list[str], predictors: list[str],
                costs: StepCosts, lookahead: int | None = None, margin: int = 0, window: int = 1,
                chunk_bytes: int | None = None, cpu: LaneCosts | None = None,
                rank_depth: int | None = None, predictor_costs: dict[str, np.ndarray] | None = None
                ) -> list[dict[str, Any]]:
    """Every capacity (total slots) x policy x predictor, plus the bounds: Belady (no prefetch), oracle
    prefetch (same lookahead and window) and deep oracle (DEEP_ORACLE_LOOKAHEAD layers ahead across
    tokens, DEEP_ORACLE_WINDOW in flight). chunk_bytes: the link's chunk (None: whole-expert FIFO);
    cpu: CPU lane costs (None: every miss is copied); rank_depth: Prefetcher's (not the bounds');
    predictor_costs: {predictor: its device seconds per layer} (`predictor_seconds`)."""
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2]
    rows = []
    preds = {name: predictor_from_trace(trace, name, lookahead) for name in predictors}
    preds["oracle"] = predictor_from_trace(trace, "oracle", lookahead or 2)
    preds["deep-oracle"] = predictor_from_trace(trace, "deep-oracle")
    for slots in capacities:
        runs = [(p, n) for p in policies for n in predictors] + list(BOUNDS.values())
        for policy, name in runs:
            minimum = k * L if policy == "lru-layer" else k
            if slots < minimum:
                continue
            w = DEEP_ORACLE_WINDOW if name == "deep-oracle" else window
            res = run_timeline(trace.routed_ids, E, slots, policy, costs, preds[name], margin, w,
                               chunk_bytes=chunk_bytes, cpu=cpu,
                               rank_depth=None if (policy, name) in BOUNDS.values() else rank_depth,
                               predictor_seconds=(predictor_costs or {}).get(name))
            rows.append({**_row(policy, name, slots, L, res), "bound": (policy, name) in BOUNDS.values(),
                         "tokens_per_second": T / res.seconds})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| capacity (per layer) | policy | predictor | hit rate | on-time hit rate | demand misses/token | "
             "prefetch hits | wasted prefetches | MB/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['capacity']} ({r['capacity_per_layer']:g}) | {r['policy']} | {r['predictor']} | "
                     f"{r['hit_rate']:.3f} | {r['on_time_hit_rate']:.3f} | {r['demand_misses_per_token']:.2f} | "
                     f"{r['prefetch_hits']} | {r['prefetch_wasted']} | {r['bytes_per_token'] / 1e6:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: str, title: str = "") -> bool:
    """Two panels over slots per layer: hit rate and on-time hit rate. One colour per predictor, one
    line style per policy; bounds dashed with square markers (Belady in black). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    predictors = sorted({r["predictor"] for r in rows})
    policies = sorted({r["policy"] for r in rows if not r.get("bound")})
    colours = dict(zip(predictors, plt.get_cmap("tab10").colors))
    styles = dict(zip(policies, ["-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2))]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, metric, label in ((axes[0], "hit_rate", "hit rate"), (axes[1], "on_time_hit_rate", "on-time hit rate")):
        for key in sorted({(r["policy"], r["predictor"]) for r in rows}):
            sel = [r for r in rows if (r["policy"], r["predictor"]) == key]
            pts = sorted((r["capacity_per_layer"], r[metric]) for r in sel)
            bound = bool(sel[0].get("bound"))
            colour = "black" if key == ("belady", "none") else colours[key[1]]
            ax.plot(*zip(*pts), color=colour, linestyle="--" if bound else styles.get(key[0], "-"),
                    marker="s" if bound else "o", markersize=3, linewidth=1.2,
                    label=f"{key[0]} / {key[1]}" + (" (bound)" if bound else ""))
        ax.set_xlabel("expert slots per layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


@dataclass
class Projection:
    tokens_per_second: float
    per_token: dict[str, float]
    limits: dict[str, float]
    settings: dict[str, Any]


def predictor_seconds(trace: RoutingTrace, predictor: str, lookahead: int, costs: StepCosts, cfg: ModelConfig,
                      hw: Hardware, impl: ImplParams | None = None) -> np.ndarray | None:
    """[L_trace] device seconds m2r2 spends per layer, from the adapters' form in the trace's meta
    ("m2r2", written by `record_with_predictions`), projected onto cfg's L layers and charged at their
    mean on every traced layer (the trace's own layer count would undercount a deeper model). Layer l
    runs min(D, L - 1 - l) rows within the token, plus D minus that past the last layer with cross-token
    adapters. Each row reads its adapter (float32: A and B, P and Q with context, C with the router
    hint; a cross head reads only its [E, R] head, its layer's shared trunk once) and its target router;
    a layer with rows adds one kernel-overhead allowance; an attention-peek row adds
    `StepCosts.peek_row`. None for other predictors or a trace without the form (not charged)."""
    form = (trace.meta or {}).get("m2r2")
    if predictor != "m2r2" or not form:
        return None
    impl = impl or IMPL_THIS
    L, H, E = cfg.num_moe_layers, cfg.hidden_size, cfg.num_local_experts
    R, context = int(form.get("rank", 0)), bool(form.get("context", True))  # older metas: the v2 defaults
    hint = E if form.get("hint_experts", 1) else 0
    pair = 4 * R * (H * (2 + 2 * context) + hint)  # A, B (+ P, Q) (+ C), float32
    router = 2 * H * E
    peek = costs.peek_row(cfg, hw, int(form.get("expert_rank", 0)), impl) if form.get("attention_peek") else 0.0
    total = 0.0
    for l in range(L):
        within = min(lookahead, L - 1 - l)
        cross = lookahead - within if form.get("cross_token") else 0
        nbytes = within * (pair + router)
        if cross and form.get("cross_heads"):
            nbytes += 4 * R * H * (1 + 2 * context) + cross * (4 * E * R + router)  # trunk once, a head per row
        else:
            nbytes += cross * (pair + router)
        if within + cross:
            total += nbytes / (hw.hbm_gbps * 1e9 * impl.kernel_efficiency) + hw.kernel_overhead_us * 1e-6
        total += within * peek
    return np.full(trace.routed_ids.shape[1], total / L)


def simulate(trace: RoutingTrace, cfg: ModelConfig, hw: Hardware, expert_dtype: str, capacity: int | None,
             predictor: str, policy: str = "lru", bookkeeping_us: float = 20.0, lookahead: int | None = None,
             margin: int = 0, window: int = 1, chunk_bytes: int | None = None, cpu: CpuProfile | None = None,
             impl: ImplParams | None = None, deep_oracle_bound: bool = True,
             rank_depth: int | None = None, dense_bytes_per_param: float | None = None) -> Projection:
    """Project decode tokens/s of `cfg` on `hw` from a routing trace of (possibly) another model.

    The trace's L_t layers are simulated with cfg's per-layer costs and the same slots per layer as the
    real model would get; the per-token time is then scaled to cfg's L layers (an assumption: every
    layer of the big model behaves like an average layer of the traced one).
    dense_bytes_per_param: the dense weights' storage (default: bf16 for the memory fit, the
    implementation's attention_bytes_per_param for their reads); given, both use it."""
    T, Lt, k = trace.routed_ids.shape
    if dense_bytes_per_param is not None:
        impl = replace(impl or IMPL_THIS, attention_bytes_per_param=dense_bytes_per_param)
    E = trace.router_probs.shape[2]
    # L: the model's MoE layers (the dense first layers hold no experts; their MLP is in the per-layer
    # dense cost, StepCosts.for_model); every per-token figure is scaled to all its layers
    L, L_all = cfg.num_moe_layers, cfg.num_hidden_layers
    costs = StepCosts.for_model(cfg, hw, expert_dtype, bookkeeping_us, impl)
    one_expert = costs.expert_bytes
    # Each traced expert stands for top_k(model) / top_k(trace) of the model's experts, with the same
    # hit rate (the residency share is kept below): its GEMMs, copy and CPU-lane work scale by that ratio,
    # else a top-8 model traced by a top-2 one would run a quarter of its experts.
    ratio = cfg.num_experts_per_tok / k
    if ratio != 1:
        costs = replace(costs, expert=costs.expert * ratio, copy=costs.copy * ratio,
                        expert_bytes=round(costs.expert_bytes * ratio))
    lane = cpu.lane_costs(costs, expert_dtype, chunk_bytes) if cpu is not None else None
    dense = int(cfg.dense_params * (dense_bytes_per_param or 2))
    kv = cfg.kv_elements_per_token * KV_TOKENS * 2
    fit = int((hw.memory_gb * 1e9 - dense - kv - device_reserve_bytes(int(hw.memory_gb * 1e9)))
              // (costs.slot_bytes or costs.expert_bytes))
    slots_model = min(capacity if capacity is not None else fit, L * cfg.num_local_experts)
    if slots_model < k:
        raise MoeOffloadError(f"{hw.name}: {slots_model} expert slots ({expert_dtype}) is below top_k={k}")
    # The same share of each layer's experts resident as in the real model (a trace of a model with
    # fewer experts per layer than cfg, e.g. 16 vs Qwen3's 128, would otherwise fit entirely).
    slots = max(k, min(Lt * E, round(slots_model / L * Lt * E / cfg.num_local_experts)))
    scale = L_all / Lt

    def per_token(res: TimelineResult) -> dict[str, float]:
        head = costs.head * res.tokens
        return {"total": ((res.seconds - head) * scale + head) / res.tokens,
                "compute": ((res.compute_seconds - head) * scale + head) / res.tokens,
                "exposed_copy": res.exposed_copy_seconds * scale / res.tokens,
                "bookkeeping": res.bookkeeping_seconds * scale / res.tokens,
                "cpu_wait": res.cpu_wait_seconds * scale / res.tokens}

    recorded = predictor_from_trace(trace, predictor, lookahead)
    pred_s = None if recorded is None else predictor_seconds(trace, predictor, recorded.lookahead, costs, cfg, hw, impl)
    res = run_timeline(trace.routed_ids, E, slots, policy, costs, recorded,
                       margin, window, chunk_bytes=chunk_bytes, cpu=lane, rank_depth=rank_depth,
                       predictor_seconds=pred_s)
    pt = per_token(res)
    belady = run_timeline(trace.routed_ids, E, slots, "belady", costs)
    pt_all = per_token(belady)  # every expert on the device (no CPU lane)
    compute_only = pt_all["compute"] + pt_all["bookkeeping"]
    link_bound = belady.stats["misses"] * scale / T * costs.copy
    limits = {"all_resident_tokens_per_second": 1.0 / compute_only,
              "link_bound_belady_tokens_per_second": 1.0 / max(compute_only, link_bound),
              "belady_misses_per_token": belady.stats["misses"] * scale * ratio / T}
    if deep_oracle_bound:
        deep = run_timeline(trace.routed_ids, E, slots, "belady", costs, predictor_from_trace(trace, "deep-oracle"),
                            0, DEEP_ORACLE_WINDOW, chunk_bytes=chunk_bytes, cpu=lane)
        limits["deep_oracle_tokens_per_second"] = 1.0 / per_token(deep)["total"]
        limits["deep_oracle_on_time_hit_rate"] = (deep.stats["hits"] - deep.stats["late_hits"]) / deep.stats["uses"]
    st = res.stats
    return Projection(
        tokens_per_second=1.0 / pt["total"], per_token=pt, limits=limits,
        settings={"hardware": hw.key, "hardware_name": hw.name, "hardware_source": hw.source,
                  "model_layers": L_all, "moe_layers": L, "trace_layers": Lt, "trace_tokens": T, "expert_dtype": expert_dtype,
                  "model_experts": cfg.num_local_experts, "trace_experts": E, "model_top_k": cfg.num_experts_per_tok,
                  "trace_top_k": k,
                  "expert_bytes": one_expert, "experts_per_traced_expert": ratio, "slot_bytes": costs.slot_bytes or costs.expert_bytes,
                  "dense_bytes": dense, "slots_model": slots_model, "slots_per_layer": slots_model / L,
                  "slots_simulated": slots, "policy": policy, "predictor": predictor,
                  "hit_rate": res.stats["hit_rate"], "on_time_hit_rate": (res.stats["hits"] - res.stats["late_hits"]) / res.stats["uses"],
                  "copy_ms": costs.copy / ratio * 1e3, "attention_ms": costs.attention * 1e3,
                  "expert_ms": costs.expert / ratio * 1e3,
                  "bookkeeping_us": bookkeeping_us, "prefetch_margin": margin, "prefetch_window": window,
                  "link_chunk_bytes": chunk_bytes, "cpu": cpu.key if cpu is not None else None,
                  "cpu_experts_per_token": st["cpu_experts"] * scale * ratio / T,
                  "on_time_share_of_hits": (st["hits"] - st["late_hits"]) / st["hits"] if st["hits"] else 0.0,
                  "implementation": (impl or IMPL_THIS).key,
                  "predictor_ms_per_token": 0.0 if pred_s is None else float(pred_s.sum()) * scale * 1e3,
                  "predictor_charged": pred_s is not None})
