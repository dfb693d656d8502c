"""M2R2 accelerator adapters: low-rank maps that move layer l's residual towards layer l+d's.

r = x + B · silu(A · rms(x)),  A [R, H], B [H, R] per (layer l, lookahead d); B starts at zero, so an
untrained adapter reproduces next-gate ("residual" variant). The adapter file is safetensors with a
metadata fingerprint of the model (config + routers + norms): loading it into another model fails.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MoeOffloadError
from ..model.layers import rms_norm
from ..model.transformer import MixtralTransformer
from .predictors import FirstLayerTable, router_probs

META_KEY = "moe_offload_accelerator"


def model_fingerprint(model: MixtralTransformer) -> str:
    """sha256 over the config and every router and post-attention norm weight (as float32)."""
    h = hashlib.sha256(json.dumps(model.cfg.as_dict(), sort_keys=True, default=str).encode())
    for layer in model.layers:
        for t in (layer.gate, layer.post_attention_layernorm):
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


class Accelerator(nn.Module):
    """Adapters for every (l, d) with l + d < L."""

    def __init__(self, hidden: int, num_layers: int, lookaheads: list[int], rank: int, seed: int = 0):
        super().__init__()
        if not lookaheads or min(lookaheads) < 1:
            raise MoeOffloadError(f"lookaheads must be positive integers, got {lookaheads}")
        if rank < 1:
            raise MoeOffloadError(f"rank must be >= 1, got {rank}")
        self.hidden, self.num_layers, self.rank = hidden, num_layers, rank
        self.lookaheads = sorted(set(lookaheads))
        self.pairs = [(l, d) for l in range(num_layers) for d in self.lookaheads if l + d < num_layers]
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.randn(rank, hidden, generator=g) / math.sqrt(hidden))
                                   for l, d in self.pairs})
        self.B = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(hidden, rank)) for l, d in self.pairs})

    def accelerate(self, layer: int, d: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] (residual entering layer's MoE) -> r [N, H], the predicted residual of layer+d."""
        key = f"{layer}_{d}"
        xf = x.float()
        z = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf + F.linear(F.silu(F.linear(z, self.A[key])), self.B[key])

    def save(self, path: str | Path, meta: dict[str, Any]) -> None:
        tensors = {f"{n}.{k}": p.detach().float().contiguous() for n in ("A", "B")
                   for k, p in getattr(self, n).items()}
        meta = {**meta, "lookaheads": self.lookaheads, "rank": self.rank, "hidden": self.hidden,
                "num_layers": self.num_layers}
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model: MixtralTransformer) -> tuple["Accelerator", dict[str, Any]]:
        """Load adapters for `model`; a file trained for another model is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise MoeOffloadError(f"{path}: accelerator file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, json.JSONDecodeError, Exception) as exc:  # safetensors has its own error types
            raise MoeOffloadError(f"{path}: not a moe_offload accelerator file ({type(exc).__name__}: {exc})") from None
        want = model_fingerprint(model)
        if meta.get("fingerprint") != want:
            raise MoeOffloadError(
                f"{path}: accelerator was trained for a different model (fingerprint {meta.get('fingerprint')}, "
                f"{meta.get('model', '?')}); this model's fingerprint is {want}. Train one for it with "
                "`moe-offload train-accelerator`")
        acc = cls(meta["hidden"], meta["num_layers"], meta["lookaheads"], meta["rank"])
        # Only the prefetch adapters ("A.*", "B.*"); other tensors in the file (the draft head) are not ours.
        acc.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("A.", "B."))})
        return acc.to(model.device), meta


class M2R2Predictor:
    """Layer l+d's norm and router applied to the accelerated residual r_{l,d}(x)."""

    name = "m2r2"

    def __init__(self, model: MixtralTransformer, accelerator: Accelerator, lookahead: int | None = None):
        self.model, self.acc = model, accelerator
        self.lookahead = lookahead or max(accelerator.lookaheads)
        missing = [d for d in range(1, self.lookahead + 1) if d not in accelerator.lookaheads]
        if missing:
            raise MoeOffloadError(f"accelerator has lookaheads {accelerator.lookaheads}; lookahead "
                                  f"{self.lookahead} also needs {missing}")
        self.first = FirstLayerTable(model, self.lookahead)

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        return self.first.top(token_id, take)

    def scores(self, layer: int, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        m = self.model
        out = torch.full((x.shape[0], self.lookahead, m.cfg.num_local_experts), float("nan"), device=x.device)
        for d in range(1, self.lookahead + 1):
            t = layer + d
            if t >= m.cfg.num_hidden_layers:
                break
            r = self.acc.accelerate(layer, d, x).to(x.dtype)
            out[:, d - 1] = router_probs(m, t, rms_norm(r, m.layers[t].post_attention_layernorm, m.cfg.rms_norm_eps))
        return out
