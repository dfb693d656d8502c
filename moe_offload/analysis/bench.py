"""`moe-offload bench cache` and `moe-offload simulate`: replay a routing trace through the real cache,
policies and prefetcher on a simulated link (moe_offload.sim)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MixtralConfig
from ..errors import MoeOffloadError
from ..offload.plan import device_reserve_bytes
from .sim import Hardware, RecordedPredictor, StepCosts, TimelineResult, run_timeline
from .trace import RoutingTrace

MODEL_CONFIGS = {"mixtral-8x7b": "mixtral-8x7b-v0.1.config.json", "mixtral-8x22b": "mixtral-8x22b-v0.1.config.json"}
KV_TOKENS = 4096


def model_config(name_or_path: str) -> MixtralConfig:
    if name_or_path in MODEL_CONFIGS:
        return MixtralConfig.from_file(Path(str(resources.files("moe_offload") / "assets" / MODEL_CONFIGS[name_or_path])))
    if Path(name_or_path).is_file():
        return MixtralConfig.from_file(name_or_path)
    raise MoeOffloadError(f"model config {name_or_path!r}: not one of {sorted(MODEL_CONFIGS)} nor a config.json file")


def predictor_from_trace(trace: RoutingTrace, name: str, lookahead: int | None = None) -> RecordedPredictor | None:
    """Recorded scores of `name` (none, next-gate, m2r2, oracle) as a replayable predictor."""
    if name == "none":
        return None
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2] if trace.router_probs is not None else int(trace.routed_ids.max()) + 1
    if name == "oracle":
        D = lookahead or 2
        truth = np.zeros((T, L, E), dtype=np.float32)
        np.put_along_axis(truth, trace.routed_ids.astype(np.int64), trace.routed_weights + 1.0, axis=2)
        preds = np.full((T, L, D, E), np.nan, dtype=np.float32)
        for d in range(1, D + 1):
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
    return RecordedPredictor(name, preds, embed)


def trace_recall(trace: RoutingTrace) -> dict[str, dict[str, dict[str, float]]]:
    """recall@d of each recorded predictor: the fraction of the true top-k experts of layer l+d found in
    the predictor's top-k (and top-(k+1)) computed at layer l, over all tokens and layers."""
    T, L, k = trace.routed_ids.shape
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, preds in (trace.preds or {}).items():
        out[name] = {}
        for d in range(1, preds.shape[2] + 1):
            if d >= L:
                break
            scores = preds[:, : L - d, d - 1]  # [T, L-d, E], made at layer l for layer l+d
            true = trace.routed_ids[:, d:].astype(np.int64)  # [T, L-d, k]
            order = np.argsort(-scores, axis=-1, kind="stable")
            cell = {}
            for label, m in (("top_k", k), ("top_k_plus_1", k + 1)):
                top = order[..., :m]
                cell[label] = float((true[..., :, None] == top[..., None, :]).any(-1).mean())
            out[name][f"d{d}"] = cell
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
            "uses": st["uses"], "hits": st["hits"], "misses": st["misses"]}


def bench_cache(trace: RoutingTrace, capacities: list[int], policies: list[str], predictors: list[str],
                costs: StepCosts, lookahead: int | None = None, margin: int = 0, window: int = 1
                ) -> list[dict[str, Any]]:
    """Every capacity (total slots) x policy x predictor, plus Belady (no prefetch) and oracle-prefetch bounds."""
    T, L, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2]
    rows = []
    preds = {name: predictor_from_trace(trace, name, lookahead) for name in predictors}
    oracle = predictor_from_trace(trace, "oracle", lookahead or 2)
    for slots in capacities:
        runs = [(p, n) for p in policies for n in predictors] + [("belady", "none"), ("predictive", "oracle")]
        for policy, name in runs:
            minimum = k * L if policy == "lru-layer" else k
            if slots < minimum:
                continue
            pred = oracle if name == "oracle" else preds[name]
            rows.append(_row(policy, name, slots, L, run_timeline(trace.routed_ids, E, slots, policy, costs, pred,
                                                                  margin, window)))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| capacity (per layer) | policy | predictor | hit rate | on-time hit rate | demand misses/token | "
             "prefetch hits | wasted prefetches | MB/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['capacity']} ({r['capacity_per_layer']:g}) | {r['policy']} | {r['predictor']} | "
                     f"{r['hit_rate']:.3f} | {r['on_time_hit_rate']:.3f} | {r['demand_misses_per_token']:.2f} | "
                     f"{r['prefetch_hits']} | {r['prefetch_wasted']} | {r['bytes_per_token'] / 1e6:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: str) -> bool:
    """Hit rate vs capacity, one line per policy/predictor. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["policy"], r["predictor"]) for r in rows}):
        pts = sorted((r["capacity_per_layer"], r["hit_rate"]) for r in rows if (r["policy"], r["predictor"]) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]} / {key[1]}")
    ax.set_xlabel("expert slots per layer")
    ax.set_ylabel("hit rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


@dataclass
class Projection:
    tokens_per_second: float
    per_token: dict[str, float]
    limits: dict[str, float]
    settings: dict[str, Any]


def simulate(trace: RoutingTrace, cfg: MixtralConfig, hw: Hardware, expert_dtype: str, capacity: int | None,
             predictor: str, policy: str = "lru", bookkeeping_us: float = 20.0, lookahead: int | None = None,
             margin: int = 0, window: int = 1) -> Projection:
    """Project decode tokens/s of `cfg` on `hw` from a routing trace of (possibly) another model.

    The trace's L_t layers are simulated with cfg's per-layer costs and the same slots per layer as the
    real model would get; the per-token time is then scaled to cfg's L layers (an assumption: every
    layer of the big model behaves like an average layer of the traced one)."""
    T, Lt, k = trace.routed_ids.shape
    E = trace.router_probs.shape[2]
    L = cfg.num_hidden_layers
    costs = StepCosts.for_model(cfg, hw, expert_dtype, bookkeeping_us)
    dense = cfg.dense_params * 2
    kv = 2 * L * cfg.num_key_value_heads * KV_TOKENS * cfg.head_dim * 2
    fit = int((hw.memory_gb * 1e9 - dense - kv - device_reserve_bytes(int(hw.memory_gb * 1e9))) // costs.expert_bytes)
    slots_model = min(capacity if capacity is not None else fit, L * cfg.num_local_experts)
    if slots_model < k:
        raise MoeOffloadError(f"{hw.name}: {slots_model} expert slots ({expert_dtype}) is below top_k={k}")
    slots = max(k, round(slots_model / L * Lt))
    scale = L / Lt

    def per_token(res: TimelineResult) -> dict[str, float]:
        head = costs.head * res.tokens
        return {"total": ((res.seconds - head) * scale + head) / res.tokens,
                "compute": ((res.compute_seconds - head) * scale + head) / res.tokens,
                "exposed_copy": res.exposed_copy_seconds * scale / res.tokens,
                "bookkeeping": res.bookkeeping_seconds * scale / res.tokens}

    res = run_timeline(trace.routed_ids, E, slots, policy, costs, predictor_from_trace(trace, predictor, lookahead),
                       margin, window)
    pt = per_token(res)
    compute_only = pt["compute"] + pt["bookkeeping"]
    belady = run_timeline(trace.routed_ids, E, slots, "belady", costs)
    link_bound = belady.stats["misses"] * scale / T * costs.copy
    return Projection(
        tokens_per_second=1.0 / pt["total"], per_token=pt,
        limits={"all_resident_tokens_per_second": 1.0 / compute_only,
                "link_bound_belady_tokens_per_second": 1.0 / max(compute_only, link_bound),
                "belady_misses_per_token": belady.stats["misses"] * scale / T},
        settings={"hardware": hw.key, "hardware_name": hw.name, "hardware_source": hw.source,
                  "model_layers": L, "trace_layers": Lt, "trace_tokens": T, "expert_dtype": expert_dtype,
                  "expert_bytes": costs.expert_bytes, "slots_model": slots_model, "slots_per_layer": slots_model / L,
                  "slots_simulated": slots, "policy": policy, "predictor": predictor,
                  "hit_rate": res.stats["hit_rate"], "on_time_hit_rate": (res.stats["hits"] - res.stats["late_hits"]) / res.stats["uses"],
                  "copy_ms": costs.copy * 1e3, "attention_ms": costs.attention * 1e3, "expert_ms": costs.expert * 1e3,
                  "bookkeeping_us": bookkeeping_us, "prefetch_margin": margin, "prefetch_window": window})
