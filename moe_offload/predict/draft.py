"""Self-speculative draft head: an accelerator adapter at an exit layer m that maps the residual
entering layer m (after layers 0..m-1) to an estimate of the final residual; the model's final norm and
LM head turn it into draft logits.

r = x + B · silu(A · rms(x)),  A [R, H], B [H, R]; B starts at zero, so an untrained head drafts with the
LM head applied to layer m's raw residual (still exact under verification, only fewer tokens accepted).

The head lives in the accelerator .safetensors file beside the prefetch adapters, under the tensor names
"draft.A" / "draft.B" and its own metadata entry DRAFT_META_KEY (exit layer, rank, model fingerprint).
`write_draft` adds or replaces only those, keeping every other tensor and metadata entry of the file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import MoeOffloadError
from ..model.layers import rms_norm
from ..model.moe import route
from ..model.transformer import MoeModel
from .accelerator import model_fingerprint

DRAFT_META_KEY = "moe_offload_draft"
DRAFT_PREFIX = "draft."
ALIGN_WEIGHT = 0.1


class DraftHead(nn.Module):
    """One low-rank adapter from the residual entering layer `exit_layer` to the final residual."""

    def __init__(self, hidden: int, exit_layer: int, rank: int, seed: int = 0):
        super().__init__()
        if exit_layer < 1:
            raise MoeOffloadError(f"draft exit layer must be >= 1, got {exit_layer}")
        if rank < 1:
            raise MoeOffloadError(f"draft rank must be >= 1, got {rank}")
        self.hidden, self.exit_layer, self.rank = hidden, exit_layer, rank
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(rank, hidden, generator=g) / math.sqrt(hidden))  # [R, H]
        self.B = nn.Parameter(torch.zeros(hidden, rank))  # [H, R]: zero, so r == x at start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] (residual entering the exit layer) -> r [N, H] float32, the estimated final residual."""
        xf = x.float()
        z = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf + F.linear(F.silu(F.linear(z, self.A)), self.B)

    def logits(self, model: MoeModel, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> draft logits [N, V] float32 (final norm + LM head on the accelerated residual)."""
        r = rms_norm(self(x), model.norm.float(), model.cfg.rms_norm_eps)
        return F.linear(r, model.lm_head_weight().float())


# --- file format ------------------------------------------------------------------------------------
def write_draft(path: str | Path, head: DraftHead, model: MoeModel, meta: dict[str, Any]) -> None:
    """Add (or replace) the draft head in adapter file `path`, keeping its other tensors and metadata.
    A new file is created if `path` does not exist. Written to a temp file, then renamed."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    fp = model_fingerprint(model)
    if path.exists():
        tensors, metadata = _read_all(path)
        other = _other_fingerprint(metadata)
        if other is not None and other != fp:
            raise MoeOffloadError(f"{path}: its prefetch adapters are for another model (fingerprint {other}); "
                                  f"this model's is {fp}: a draft head can only join a file of the same model")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(DRAFT_PREFIX)}
    tensors[DRAFT_PREFIX + "A"] = head.A.detach().float().cpu().contiguous()
    tensors[DRAFT_PREFIX + "B"] = head.B.detach().float().cpu().contiguous()
    metadata[DRAFT_META_KEY] = json.dumps({**meta, "fingerprint": fp, "exit_layer": head.exit_layer,
                                           "rank": head.rank, "hidden": head.hidden})
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_draft(path: str | Path, model: MoeModel) -> tuple[DraftHead, dict[str, Any]]:
    """The draft head stored in `path` for `model`; a clear error if absent or for another model."""
    if model.first_moe:
        raise MoeOffloadError("self-speculative draft heads are not supported yet for models with dense first "
                              "layers (first_k_dense_replace)")
    path = Path(path)
    if not path.is_file():
        raise MoeOffloadError(f"{path}: adapter file not found")
    tensors, metadata = _read_all(path)
    if DRAFT_META_KEY not in metadata or DRAFT_PREFIX + "A" not in tensors:
        raise MoeOffloadError(f"{path}: has no draft head (tensors draft.A/draft.B); add one with "
                              "`moe-offload train-accelerator --draft-exit auto --draft-only --out FILE`")
    meta = json.loads(metadata[DRAFT_META_KEY])
    want = model_fingerprint(model)
    if meta.get("fingerprint") != want:
        raise MoeOffloadError(f"{path}: the draft head was trained for a different model (fingerprint "
                              f"{meta.get('fingerprint')}); this model's fingerprint is {want}")
    L = model.cfg.num_hidden_layers
    if not 1 <= int(meta["exit_layer"]) < L:
        raise MoeOffloadError(f"{path}: draft exit layer {meta['exit_layer']} is not in [1, {L - 1}]")
    head = DraftHead(int(meta["hidden"]), int(meta["exit_layer"]), int(meta["rank"]))
    head.load_state_dict({"A": tensors[DRAFT_PREFIX + "A"], "B": tensors[DRAFT_PREFIX + "B"]})
    return head.to(model.device), meta


def _read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors has its own error types
        raise MoeOffloadError(f"{path}: not a safetensors adapter file ({type(exc).__name__}: {exc})") from None


def _other_fingerprint(metadata: dict[str, str]) -> str | None:
    for key, value in metadata.items():
        if key == DRAFT_META_KEY:
            continue
        try:
            fp = json.loads(value).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            continue
        if fp is not None:
            return fp
    return None


# --- training -----------------------------------------------------------------------------------------
@torch.no_grad()
def collect_states(model: MoeModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One window through the frozen model (causal, no cache): the residual entering every layer and the
    final residual, xs [T, L+1, H] float32, and the full model's next-token log-probs [T, V]."""
    if model.first_moe:
        raise MoeOffloadError("self-speculative draft heads are not supported yet for models with dense first "
                              "layers (first_k_dense_replace)")
    eps = model.cfg.rms_norm_eps
    x = F.embedding(torch.tensor([ids], device=model.device), model.embed_tokens)  # [1, T, H]
    xs = []
    for i, layer in enumerate(model.layers):
        xs.append(x[0].float())
        x = x + model._attention(rms_norm(x, layer.input_layernorm, eps), i, 0, None)
        x = x + model.moe_block(rms_norm(x, layer.post_attention_layernorm, eps), i, 0)
    xs.append(x[0].float())
    logp = F.log_softmax(F.linear(rms_norm(x, model.norm, eps), model.lm_head_weight())[0].float(), dim=-1)
    return torch.stack(xs, dim=1).clone(), logp.clone()


def draft_loss(model: MoeModel, head: DraftHead, xs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(full || draft) over the vocabulary plus ALIGN_WEIGHT * (1 - cos(r, final residual))."""
    r = head(xs[:, head.exit_layer])  # [T, H]
    logq = F.log_softmax(F.linear(rms_norm(r, model.norm.float(), model.cfg.rms_norm_eps),
                                  model.lm_head_weight().float()), dim=-1)  # [T, V]
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    align = 1 - F.cosine_similarity(r, xs[:, -1], dim=-1).mean()
    return kl + ALIGN_WEIGHT * align


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


@torch.no_grad()
def greedy_agreement(model: MoeModel, heads: dict[int, DraftHead], states: list) -> dict[int, float]:
    """Fraction of held-out positions where the draft's argmax equals the full model's, per exit layer."""
    hit = {m: 0 for m in heads}
    n = 0
    for xs, logp in states:
        full = logp.argmax(-1)  # [T]
        n += full.numel()
        for m, head in heads.items():
            hit[m] += int((head.logits(model, xs[:, m]).argmax(-1) == full).sum())
    return {m: hit[m] / max(1, n) for m in heads}


def expected_speedup(accept: float, exit_layer: int, num_layers: int, max_draft: int = 8) -> tuple[float, int]:
    """Tokens per unit of full-forward cost with i.i.d. acceptance `accept`, draft cost m/L per draft
    token, best draft length g <= max_draft: max_g (1 - a^(g+1)) / (1 - a) / (1 + g m / L)."""
    best = (1.0, 0)
    for g in range(1, max_draft + 1):
        tokens = float(g + 1) if accept >= 1 else (1 - accept ** (g + 1)) / (1 - accept)
        best = max(best, (tokens / (1 + g * exit_layer / num_layers), g))
    return best


def train_draft(model: MoeModel, ids: list[int], *, exit_layer: int | str = "auto", rank: int = 64,
                epochs: int = 2, lr: float = 3e-3, window: int = 256, heldout_fraction: float = 0.1,
                seed: int = 0, show_progress: bool = True) -> tuple[DraftHead, dict[str, Any]]:
    """Train draft heads on the frozen model (one per candidate exit layer when exit_layer is "auto",
    all from the same streamed forward passes) and keep the one with the best expected speedup on the
    held-out tail (greedy agreement measured there). Returns the head and a report."""
    t0 = time.time()
    L = model.cfg.num_hidden_layers
    if exit_layer == "auto":
        exits = list(range(1, L))
    else:
        if not isinstance(exit_layer, int) or not 1 <= exit_layer < L:
            raise MoeOffloadError(f"--draft-exit must be auto or an integer in [1, {L - 1}], got {exit_layer!r}")
        exits = [exit_layer]
    split = int(len(ids) * (1 - heldout_fraction))
    chunks = _windows(ids[:split], window)
    held = [collect_states(model, w) for w in _windows(ids[split:], window)]
    heads = {m: DraftHead(model.cfg.hidden_size, m, rank, seed).to(model.device) for m in exits}
    before = greedy_agreement(model, heads, held)
    opts = {m: torch.optim.Adam(h.parameters(), lr=lr) for m, h in heads.items()}
    g = torch.Generator().manual_seed(seed)
    with tqdm(total=epochs * len(chunks), desc="training draft head", unit="window",
              disable=not show_progress) as bar:
        for _ in range(epochs):
            for i in torch.randperm(len(chunks), generator=g).tolist():
                xs, logp = collect_states(model, chunks[i])  # streamed: one window in memory at a time
                for m, head in heads.items():
                    with torch.enable_grad():
                        loss = draft_loss(model, head, xs, logp)
                        opts[m].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[m].step()
                bar.update()
    after = greedy_agreement(model, heads, held)
    scored = {m: expected_speedup(after[m], m, L) for m in exits}
    best = max(exits, key=lambda m: scored[m][0])
    report = {"train_tokens": split, "heldout_tokens": len(ids) - split, "epochs": epochs, "rank": rank,
              "lr": lr, "window": window, "exit_layer": best,
              "candidates": {str(m): {"heldout_greedy_agreement_before": before[m],
                                      "heldout_greedy_agreement": after[m],
                                      "expected_tokens_per_cost": scored[m][0], "best_draft_tokens": scored[m][1]}
                             for m in exits},
              "train_seconds": time.time() - t0}
    return heads[best], report


# --- drafting with resident experts only ----------------------------------------------------------------
def resident_route(logits: torch.Tensor, k: int, resident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing restricted to resident experts: logits [N, E], resident [E] bool on the device, k <= the
    number of residents (the caller knows it on the host) -> (weights [N, k], ids [N, k]): each routed
    expert that is not resident is replaced by the best-scoring resident one (top-k among residents,
    weights renormalised over the chosen ones as usual)."""
    masked = logits.float().masked_fill(~resident, float("-inf"))  # [N, E]
    return route(masked, k)
