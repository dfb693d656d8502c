"""Record routing over a text (teacher forcing, chunked prefill) and replay it through an expert cache."""

from __future__ import annotations

import json
import zipfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import MoeOffloadError
from ..model.observers import Observer, observing
from ..model.transformer import KVCache, MoeModel
from ..offload.cache import ExpertCache
from ..predict.predictors import embedding_router_probs


@dataclass
class RoutingTrace:
    """Decode-order routing of a text. Arrays (T tokens, L layers, k, D lookaheads, E experts):
    token_ids [T], routed_ids [T, L, k], routed_weights [T, L, k], router_probs [T, L, E], and
    preds {name: [T, L, D, E]} where preds[name][t, l, d-1] are the scores computed at layer l for
    layer l+d (NaN past the last layer)."""

    token_ids: np.ndarray
    routed_ids: np.ndarray
    routed_weights: np.ndarray
    window: int
    router_probs: np.ndarray | None = None
    preds: dict | None = None
    meta: dict | None = None
    embed_preds: np.ndarray | None = None  # [T, D, E] next-gate on each token's embedding, layers 0..D-1


def trace_prefix(trace: RoutingTrace, n: int | None) -> RoutingTrace:
    """The first n tokens of a trace (all of it when n is None)."""
    if n is None or n >= len(trace.token_ids):
        return trace
    cut = lambda a: None if a is None else a[:n]  # noqa: E731
    return RoutingTrace(trace.token_ids[:n], trace.routed_ids[:n], trace.routed_weights[:n], trace.window,
                        cut(trace.router_probs), {k: v[:n] for k, v in (trace.preds or {}).items()} or None,
                        trace.meta, cut(trace.embed_preds))


def record_routing(model: MoeModel, token_ids: list[int], window: int, chunk: int = 128,
                   show_progress: bool = False, predictors: dict | None = None) -> RoutingTrace:
    """Route every token of `token_ids` as decode would: sequences of `window` tokens, each prefilled
    in chunks of `chunk` through the KV cache (routing at a position depends only on the tokens up to
    it, so this equals token-by-token decode). `predictors` {name: Predictor} adds their scores."""
    cfg = model.cfg
    n, L, E = len(token_ids), cfg.num_moe_layers, cfg.num_local_experts
    ids_out = np.zeros((n, L, cfg.num_experts_per_tok), dtype=np.int16)
    w_out = np.zeros((n, L, cfg.num_experts_per_tok), dtype=np.float32)
    probs_out = np.zeros((n, L, E), dtype=np.float32)
    preds = {name: np.full((n, L, p.lookahead, E), np.nan, dtype=np.float32) for name, p in (predictors or {}).items()}
    D = max([p.lookahead for p in (predictors or {}).values()], default=0)
    embed = np.zeros((n, min(D, L), E), dtype=np.float32) if predictors else None
    cache = KVCache(cfg, 1, window, model.dtype, model.device)
    pos = {"start": 0}  # index into the text of the running chunk's first token
    # Attention-peek predictors read a later layer's keys at earlier positions: scored once the chunk's
    # forward has filled the cache, each row seeing the real keys before it (what decode sees).
    deferred = {name for name, p in (predictors or {}).items() if getattr(getattr(p, "acc", None), "peek", False)}
    residuals: list[tuple[int, torch.Tensor]] = []

    class Recorder(Observer):
        steers_routing = False  # reads the routing only

        def on_step(self, input_ids, start_pos, host_ids):
            if embed is not None:  # next-gate on the embedding: how the runtime plans a token's first layers
                s, x = pos["start"], model.embed_tokens[input_ids.reshape(-1)]
                embed[s:s + x.shape[0]] = embedding_router_probs(model, x, embed.shape[1]).cpu().numpy()

        def on_routing(self, layer, ids, weights, logits, start_pos):
            s = pos["start"]
            ids_out[s:s + ids.shape[0], layer] = ids.cpu().numpy()
            w_out[s:s + ids.shape[0], layer] = weights.cpu().numpy()
            probs_out[s:s + ids.shape[0], layer] = torch.softmax(logits.float(), -1).cpu().numpy()

        def on_residual(self, layer, x, start_pos):
            s = pos["start"]
            for name, p in (predictors or {}).items():
                if name not in deferred:
                    preds[name][s:s + x.shape[0], layer] = p.scores(layer, x, s).float().cpu().numpy()
            if deferred:
                residuals.append((layer, x.clone()))

    with observing(model, Recorder()), torch.inference_mode(), \
            tqdm(total=n, unit="tok", desc="routing", disable=not show_progress) as bar:
        for w0 in range(0, n, window):
            for c0 in range(w0, min(n, w0 + window), chunk):
                c1 = min(n, w0 + window, c0 + chunk)
                pos["start"] = c0
                model(torch.tensor([token_ids[c0:c1]], device=model.device), c0 - w0, cache)
                history = (cache, c0 - w0, c1 - w0)  # the chunk's real keys are in the cache now
                for layer, x in residuals:
                    for name in deferred:
                        preds[name][c0:c1, layer] = predictors[name].scores(layer, x, c0, history).float().cpu().numpy()
                residuals.clear()
                bar.update(c1 - c0)
    return RoutingTrace(np.asarray(token_ids), ids_out, w_out, window, probs_out, preds or None, embed_preds=embed)


DEFAULT_TRACE_LOOKAHEAD = 3


def record_with_predictions(model: MoeModel, token_ids: list[int], window: int, lookahead: int | None,
                            accelerator: str | Path | None = None, show_progress: bool = False) -> RoutingTrace:
    """record_routing plus next-gate scores and, given adapters, m2r2 scores. lookahead None: next-gate
    DEFAULT_TRACE_LOOKAHEAD ahead, m2r2 as the runtime would (cross-token adapters: their whole range);
    an explicit lookahead past the adapters' range is refused. meta["lookaheads"] says what was recorded."""
    from ..predict import Accelerator, M2R2Predictor, NextGate, m2r2_lookahead

    preds = {"next-gate": NextGate(model, lookahead or DEFAULT_TRACE_LOOKAHEAD)}
    form = None
    if accelerator is not None:
        acc, _ = Accelerator.load(accelerator, model)
        preds["m2r2"] = M2R2Predictor(model, acc, m2r2_lookahead(acc, lookahead, DEFAULT_TRACE_LOOKAHEAD, accelerator))
        # the adapters' form, in the trace's meta: what the simulator charges for running them
        form = {"attention_peek": acc.peek, "expert_rank": acc.expert_rank, "rank": acc.rank,
                "lookaheads": acc.lookaheads, "cross_token": acc.cross_token, "cross_heads": acc.cross_heads,
                "context": acc.context, "hint_experts": 0}  # no router hint (older metas default to one)
    trace = record_routing(model, token_ids, window, show_progress=show_progress, predictors=preds)
    trace.meta = {**(trace.meta or {}), "lookaheads": {name: p.lookahead for name, p in preds.items()}}
    if form is not None:
        trace.meta["m2r2"] = form
    return trace


def save_trace(path: str | Path, trace: RoutingTrace, meta: dict) -> Path:
    """Write the trace as .npz (arrays named as in RoutingTrace; preds as pred_<name> with '-' -> '_')."""
    path = Path(path)
    arrays = {"token_ids": trace.token_ids, "routed_ids": trace.routed_ids, "routed_weights": trace.routed_weights,
              "router_probs": trace.router_probs,
              "meta": np.array(json.dumps({**meta, "window": trace.window}))}
    for name, a in (trace.preds or {}).items():
        arrays["pred_" + name.replace("-", "_")] = a
    if trace.embed_preds is not None:
        arrays["embed_next_gate"] = trace.embed_preds
    tmp = path.with_name(path.name + ".partial.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        if isinstance(exc, OSError):
            raise MoeOffloadError(f"{path}: cannot write the trace: {exc.strerror or exc}") from None
        raise
    return path


def load_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    try:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        preds = {k[5:].replace("_", "-"): z[k] for k in z.files if k.startswith("pred_")}
        return RoutingTrace(z["token_ids"], z["routed_ids"], z["routed_weights"], meta.get("window", 0),
                            z["router_probs"] if "router_probs" in z.files else None, preds or None, meta,
                            z["embed_next_gate"] if "embed_next_gate" in z.files else None)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MoeOffloadError(f"{path}: not a moe_offload routing trace (.npz), or truncated: {exc}") from None


def replay(cache: ExpertCache, routed_ids: np.ndarray) -> dict:
    """Drive the cache with recorded decode routing [T, L, k]: per token, per layer, acquire and
    release the routed experts (real copies, real policy). Returns host seconds spent per layer."""
    t_total = 0.0
    steps = 0
    for t in range(routed_ids.shape[0]):
        for layer in range(routed_ids.shape[1]):
            experts = np.unique(routed_ids[t, layer]).tolist()
            t0 = time.perf_counter()
            cache.acquire(layer, experts)
            cache.release(layer, experts)
            t_total += time.perf_counter() - t0
            steps += 1
    return {"layer_steps": steps, "host_seconds": t_total}
