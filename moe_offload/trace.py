"""Record routing over a text (teacher forcing, chunked prefill) and replay it through an expert cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .experts.cache import ExpertCache
from .model.transformer import KVCache, MixtralTransformer


@dataclass
class RoutingTrace:
    """routed_ids [T, L, k] and routed_weights [T, L, k] for token_ids [T], in decode order."""

    token_ids: np.ndarray
    routed_ids: np.ndarray
    routed_weights: np.ndarray
    window: int


def record_routing(model: MixtralTransformer, token_ids: list[int], window: int, chunk: int = 128,
                   show_progress: bool = False) -> RoutingTrace:
    """Route every token of `token_ids` as decode would: sequences of `window` tokens, each prefilled
    in chunks of `chunk` through the KV cache (routing at a position depends only on the tokens up to
    it, so this equals token-by-token decode)."""
    cfg = model.cfg
    n = len(token_ids)
    ids_out = np.zeros((n, cfg.num_hidden_layers, cfg.num_experts_per_tok), dtype=np.int16)
    w_out = np.zeros((n, cfg.num_hidden_layers, cfg.num_experts_per_tok), dtype=np.float32)
    cache = KVCache(cfg, 1, window, model.dtype, model.device)
    pos = {"start": 0}

    def hook(layer: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> None:
        s = pos["start"]
        ids_out[s:s + ids.shape[0], layer] = ids.cpu().numpy()
        w_out[s:s + ids.shape[0], layer] = weights.cpu().numpy()

    old, model.routing_hook = model.routing_hook, hook
    try:
        with torch.inference_mode(), tqdm(total=n, unit="tok", desc="routing", disable=not show_progress) as bar:
            for w0 in range(0, n, window):
                for c0 in range(w0, min(n, w0 + window), chunk):
                    c1 = min(n, w0 + window, c0 + chunk)
                    pos["start"] = c0
                    model(torch.tensor([token_ids[c0:c1]], device=model.device), c0 - w0, cache)
                    bar.update(c1 - c0)
    finally:
        model.routing_hook = old
    return RoutingTrace(np.asarray(token_ids), ids_out, w_out, window)


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
