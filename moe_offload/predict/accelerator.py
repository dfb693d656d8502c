"""M2R2 accelerator adapters: low-rank maps that move layer l's residual towards layer l+d's.

r = x + B · silu(A · rms(x)),  A [R, H], B [H, R] per (layer l, lookahead d); B starts at zero, so an
untrained adapter reproduces next-gate ("residual" variant).

Optional parts (files without their tensors load and predict exactly as before):
  context  P, Q [R, H]: r = x + B · silu(A · rms(x) + P · rms(x_prev) + Q · rms(m_prev)), x_prev = the
        residual entering layer l's MoE at the previous position, m_prev = a decayed mean of all earlier
        positions' residuals (m <- CONTEXT_DECAY·m + (1 - CONTEXT_DECAY)·x; both zero at position 0):
        some of the context that layers l+1.. will attend to. P, Q start at zero. Tensors "P.{l}_{d}",
        "Q.{l}_{d}". M2R2Predictor carries each layer's state between calls (`M2R2Predictor.observe`).
  cross-token  pairs with l + d >= L: the adapter at (l, d) predicts layer (l + d) mod L of the token
        (l + d) // L positions later (the next token's layers, read by its router), so plans reach
        across the token boundary, as far ahead as a copy lasts. Trained on the shifted targets
        (`Accelerator.target`); metadata "cross_token": true.
  cross heads  (cross_heads, with cross_token): the rows past the last layer share one trunk per layer
        (XA, XP, XQ [R, H]: h = silu(XA · rms(x) + XP · rms(x_prev) + XQ · rms(m_prev))) and each keeps
        only a logit head XH [E, R] added to the target router's logits on today's residual:
        logits = G_t · rms_norm(x, w_t) + XH · h. Per row E·R parameters instead of 4·R·H: for Mixtral
        (32 layers, lookahead 64, rank 128) its 1552 rows past the last layer take ~0.2 GB of float32
        instead of ~13 GB (the 496 rows within the token keep their adapters). Tensors "XA.{l}",
        "XP.{l}", "XQ.{l}", "XH.{l}_{d}"; metadata "cross_heads": true.
  attention peek  (within-token pairs): the accelerated residual runs through the real attention of
        the layers it passes: s_0 = x, s_j = s_{j-1} + moe~_{l+j-1}(s_{j-1}) + attn_{l+j}(...) (`chain`),
        keys and values of earlier positions read from the KV cache (`peek.peek_attention`),
        and the pair's adapter adds its correction to s_d instead of x: the context the later layers
        attend to, which the current residual alone lacks. moe~ is zero, or with expert_rank R2 > 0 a
        low-rank stand-in of each expert (U [E, R2, H], V [E, H, R2] per layer; tensors "U.{l}", "V.{l}"),
        mixed by the router of that layer on s, fitted to the real experts' output. Costs one attention
        and one stand-in MoE per predicted layer. Metadata "attention_peek": true, "expert_rank": R2.

Routers: the scores rank experts as the target layer's router chooses them (`choice_scores`): the
softmax (Mixtral, Qwen, OLMoE), or for sigmoid routers (GLM-4.5) the sigmoid plus the layer's
e_score_correction_bias with the experts outside the topk_group best groups at -inf; training distils
each router in its own form (train.adapter_loss). The file carries nothing about the router: the
fingerprint ties it to the model, whose config says how it routes.

The adapter file is safetensors with a metadata fingerprint of the model (config + routers + norms):
loading it into another model fails.
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

from ..checkpoint import Checkpoint, identity_names
from ..errors import MoeOffloadError
from ..model.layers import rms_norm
from ..model.transformer import MoeModel, RowPositions
from .peek import peek_attention
from .predictors import FirstLayerTable, router_probs

META_KEY = "moe_offload_accelerator"
CONTEXT_DECAY = 0.8  # per position, of the decayed mean of earlier residuals the context part reads
_BLOCK = 64  # rows per step of the decayed-mean recurrence (a [64, 64] weight matrix per step)


def model_fingerprint(model: MoeModel) -> str:
    """The model's identity from its checkpoint's bytes (Checkpoint.fingerprint: config + every router
    and post-attention norm tensor as stored), so it does not depend on the compute dtype or device."""
    fp = getattr(model, "source_fingerprint", None)
    if fp is None:
        raise MoeOffloadError("model_fingerprint: this model was not loaded from a checkpoint "
                              "(MoeModel.from_checkpoint sets its fingerprint)")
    return fp


def legacy_fingerprint(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> str:
    """The fingerprint files were stamped with before checkpoint-byte fingerprints: sha256 over the
    config and the router/norm weights after the cast to the compute dtype (float32 on cpu), taken as
    float32, so it changed with --dtype. Kept only to recognise old files in `restamp`."""
    h = hashlib.sha256(json.dumps(ckpt.config.as_dict(), sort_keys=True, default=str).encode())
    for layer in range(ckpt.config.num_hidden_layers):
        for name in identity_names(ckpt.config, layer):
            t = ckpt.tensor(name, dtype).float()
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def restamp(path: str | Path, model_path: str | Path) -> str:
    """Re-stamp an accelerator file that carries the legacy (compute-dtype, float32) fingerprint of
    the model at `model_path` with that model's checkpoint-byte fingerprint (no retraining). Tensors
    are kept bit for bit; the file is rewritten through a temp file and a rename. Returns the new
    fingerprint. A file already stamped with it is left alone; one stamped for another model is refused."""
    path = Path(path)
    meta, tensors = _read_file(path)
    ckpt = Checkpoint(model_path)
    new = ckpt.fingerprint()
    if meta.get("fingerprint") == new:
        return new
    old = legacy_fingerprint(ckpt)
    if meta.get("fingerprint") != old:
        raise MoeOffloadError(f"{path}: stamped with fingerprint {meta.get('fingerprint')!r}, which is neither "
                              f"the legacy ({old}) nor the current ({new}) fingerprint of {model_path}; "
                              "not re-stamping a file trained for another model")
    meta = {**meta, "fingerprint": new, "legacy_fingerprint": old}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return new


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An accelerator file's metadata and tensors; anything else is a one-line MoeOffloadError."""
    if not path.is_file():
        raise MoeOffloadError(f"{path}: accelerator file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors has its own error types; KeyError/JSONDecodeError for the metadata
        raise MoeOffloadError(f"{path}: not a moe_offload accelerator file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise MoeOffloadError(f"{path}: not a moe_offload accelerator file (metadata is not a JSON object)")
    return meta, tensors


def _rms(x: torch.Tensor) -> torch.Tensor:
    """x [N, H] float32 scaled to unit root-mean-square (a zero row stays zero)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


_WEIGHTS: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _decay_weights(decay: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decayed-mean recurrence over one block: w [B, B] (row i weighs row j < i by
    (1 - decay)·decay^(i-1-j)) and powers [B, 1] (decay^i, the carried mean's weight); cached per device."""
    key = (decay, str(device))
    if key not in _WEIGHTS:
        i = torch.arange(_BLOCK, device=device)
        lag = (i[:, None] - 1 - i[None, :]).float()  # [B, B]
        w = torch.where(lag >= 0, (1 - decay) * decay ** lag.clamp_min(0), torch.zeros((), device=device))
        _WEIGHTS[key] = (w, decay ** i.float()[:, None])
    return _WEIGHTS[key]


def context_rows(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                 decay: float = CONTEXT_DECAY) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x [N, H] rows at consecutive positions -> (ctx [N, 2H] float32, state after the chunk).
    ctx row i = [x_{i-1}, m_i] with m_i = decay·m_{i-1} + (1 - decay)·x_{i-1}; state = (the row before
    the chunk [1, H], m at the chunk's first row [1, H]), zero at position 0 (state None)."""
    xf = x.float()
    last, m = state if state is not None else (torch.zeros_like(xf[:1]), torch.zeros_like(xf[:1]))
    prev = torch.cat([last.float().reshape(1, -1), xf[:-1]])  # [N, H]
    w, powers = _decay_weights(decay, xf.device)
    means, m = [], m.float().reshape(1, -1)
    for b0 in range(0, xf.shape[0], _BLOCK):
        xb = xf[b0:b0 + _BLOCK]  # [b, H]
        n = xb.shape[0]
        mb = powers[:n] * m + w[:n, :n] @ xb  # [b, H]
        means.append(mb)
        m = decay * mb[-1:] + (1 - decay) * xb[-1:]
    return torch.cat([prev, torch.cat(means)], dim=-1), (xf[-1:].clone(), m)


class Accelerator(nn.Module):
    """Adapters for every (l, d) with l + d < L (every (l, d) with cross_token)."""

    def __init__(self, hidden: int, num_layers: int, lookaheads: list[int], rank: int, seed: int = 0,
                 context: bool = False, cross_token: bool = False, peek: bool = False, expert_rank: int = 0,
                 num_experts: int = 0, cross_heads: bool = False):
        """context: adds P [R, H] per pair, reading the previous position's residual; cross_token: pairs
        past the last layer predict later tokens' layers (`target`); peek: within-token pairs run
        through the real attention of the layers they pass (`chain`); expert_rank: with peek, low-rank
        stand-ins of each layer's num_experts experts on the way; cross_heads: the rows past the last
        layer as a shared trunk per layer and a logit head per row over num_experts (`head_logits`)."""
        super().__init__()
        if not lookaheads or min(lookaheads) < 1:
            raise MoeOffloadError(f"lookaheads must be positive integers, got {lookaheads}")
        if rank < 1:
            raise MoeOffloadError(f"rank must be >= 1, got {rank}")
        self.hidden, self.num_layers, self.rank = hidden, num_layers, rank
        self.lookaheads = sorted(set(lookaheads))
        self.cross_token = bool(cross_token)
        self.peek, self.expert_rank, self.num_experts = bool(peek), int(expert_rank), int(num_experts)
        if self.expert_rank < 0 or (self.expert_rank and (not self.peek or self.num_experts < 1)):
            raise MoeOffloadError(f"expert_rank {expert_rank} needs peek and num_experts >= 1 "
                                  f"(got peek={peek}, num_experts={num_experts})")
        self.cross_heads = bool(cross_heads)
        if self.cross_heads and (not self.cross_token or self.num_experts < 1):
            raise MoeOffloadError(f"cross_heads needs cross_token and num_experts >= 1 (got cross_token={cross_token}, "
                                  f"num_experts={num_experts})")
        self.pairs = [(l, d) for l in range(num_layers) for d in self.lookaheads
                      if l + d < num_layers or self.cross_token]
        # the pairs with their own residual adapter (all of them, or those within the token with heads)
        self.residual_pairs = [(l, d) for l, d in self.pairs if not self.is_head(l, d)]
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.randn(rank, hidden, generator=g) / math.sqrt(hidden))
                                   for l, d in self.residual_pairs})
        self.B = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(hidden, rank)) for l, d in self.residual_pairs})
        self.context = bool(context)
        if self.context:
            self.P = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(rank, hidden)) for l, d in self.residual_pairs})
            self.Q = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(rank, hidden)) for l, d in self.residual_pairs})
        if self.expert_rank:  # drawn last: the other parts' draws do not depend on it
            R2, E = self.expert_rank, self.num_experts
            self.U = nn.ParameterDict({str(l): nn.Parameter(torch.randn(E, R2, hidden, generator=g) / math.sqrt(hidden))
                                       for l in range(num_layers - 1)})
            self.V = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(E, hidden, R2)) for l in range(num_layers - 1)})
        if self.cross_heads:  # drawn after the rest (A is drawn for the residual pairs only)
            trunks = sorted({l for l, d in self.pairs if self.is_head(l, d)})
            self.XA = nn.ParameterDict({str(l): nn.Parameter(torch.randn(rank, hidden, generator=g) / math.sqrt(hidden))
                                        for l in trunks})
            if self.context:
                self.XP = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(rank, hidden)) for l in trunks})
                self.XQ = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(rank, hidden)) for l in trunks})
            self.XH = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(self.num_experts, rank))
                                        for l, d in self.pairs if self.is_head(l, d)})

    def target(self, layer: int, d: int) -> tuple[int, int]:
        """(positions ahead, layer) that the adapter at (layer, d) predicts: (0, layer + d) within the
        token, (q, (layer + d) mod L) for the token q = (layer + d) // L positions later."""
        return divmod(layer + d, self.num_layers)

    def is_head(self, layer: int, d: int) -> bool:
        """Whether the pair (layer, d) is a logit head on its layer's shared trunk (cross_heads, rows past
        the last layer) rather than a residual adapter."""
        return self.cross_heads and layer + d >= self.num_layers

    def trunk(self, layer: int, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The cross heads' shared trunk of `layer` on x [N, H] (and its context prev [N, 2H]) -> [N, R]."""
        key = str(layer)
        a = F.linear(_rms(x.float()), self.XA[key])  # [N, R]
        if self.context:
            if prev is None:
                raise MoeOffloadError("these cross heads read the previous positions: pass prev=context_rows(x)[0]")
            h = self.hidden
            a = a + F.linear(_rms(prev[:, :h].float()), self.XP[key]) + F.linear(_rms(prev[:, h:].float()), self.XQ[key])
        return F.silu(a)

    def head_logits(self, model: MoeModel, layer: int, d: int, x: torch.Tensor,
                    prev: torch.Tensor | None = None) -> torch.Tensor:
        """A cross head's router logits [N, E] float32 for the layer it targets in a later token: that
        layer's router on today's residual x [N, H] plus XH · trunk (zero XH: the router alone)."""
        t = self.target(layer, d)[1]
        w = model.moe_layers[t]
        base = model.router_logits(t, rms_norm(x.to(model.dtype), w.post_attention_layernorm, model.cfg.rms_norm_eps))
        return base.float() + F.linear(self.trunk(layer, x, prev), self.XH[f"{layer}_{d}"])

    def peeks(self, layer: int, d: int) -> bool:
        """Whether the pair (layer, d) runs through the real attention of layers layer+1..layer+d (within
        the token only: a later token's attention would need keys that do not exist yet)."""
        return self.peek and layer + d < self.num_layers

    def stand_in(self, model: MoeModel, layer: int, s: torch.Tensor) -> torch.Tensor:
        """The low-rank stand-in of layer's routed experts on residual s [N, H] -> [N, H] float32 (zero
        without expert_rank), mixed by layer's router on s as the model mixes them."""
        if not self.expert_rank:
            return torch.zeros_like(s, dtype=torch.float32)
        w = model.moe_layers[layer]
        normed = rms_norm(s.to(model.dtype), w.post_attention_layernorm, model.cfg.rms_norm_eps)  # [N, H]
        weights, ids = model.route(layer, model.router_logits(layer, normed))
        n, U, V = normed.float(), self.U[str(layer)], self.V[str(layer)]
        if ids.numel() < self.num_experts:  # decode: only the chosen experts' stand-ins
            h = F.silu(torch.einsum("nkrh,nh->nkr", U[ids], n))  # [N, k, R2]
            return torch.einsum("nkhr,nkr,nk->nh", V[ids], h, weights)  # [N, H]
        mix = torch.zeros(s.shape[0], self.num_experts, device=s.device).scatter_(1, ids, weights)  # [N, E]
        h = F.silu(torch.einsum("erh,nh->ner", U, n))  # [N, E, R2]: every expert, masked by mix
        return torch.einsum("ehr,ner,ne->nh", V, h, mix)  # [N, H]

    def moe_estimate(self, model: MoeModel, layer: int, s: torch.Tensor) -> torch.Tensor:
        """Layer's MoE output on residual s [N, H] as the chain estimates it: the stand-ins of the routed
        experts plus, for families that have one, the resident shared expert itself. [N, H] float32."""
        y = self.stand_in(model, layer, s)
        if model.cfg.has_shared_expert:
            normed = rms_norm(s.to(model.dtype), model.moe_layers[layer].post_attention_layernorm, model.cfg.rms_norm_eps)
            y = y + model.shared_expert(normed, layer).float()
        return y

    def chain(self, model: MoeModel, layer: int, x: torch.Tensor, depth: int, start: Any, cache: Any,
              real_until: int | None = None) -> list[torch.Tensor]:
        """x [N, H] (the residual entering layer's MoE) -> [s_1 .. s_depth], s_j [N, H] float32: the
        estimated residual entering layer+j's MoE. Each step adds the stand-in of the previous layer's
        experts and layer+j's real attention (`peek.peek_attention`: earlier positions'
        keys from `cache`; N = B * T rows of its batch B, or B rows at RowPositions)."""
        b = x.shape[0] if isinstance(start, RowPositions) else (cache.k.shape[1] if cache is not None else 1)
        s, out = x.float(), []
        for j in range(1, min(depth, self.num_layers - 1 - layer) + 1):
            s = s + self.moe_estimate(model, layer + j - 1, s)
            t = s.to(model.dtype).view(b, s.shape[0] // b, -1)  # [B, T, H]
            s = s + peek_attention(model, layer + j, t, start, cache, real_until).reshape(s.shape).float()
            out.append(s)
        return out

    def _file_prefix(self, group: str) -> str:
        """The file's tensor prefix of a parameter group: the attention-peek correction B is stored as
        "Bpeek", so a reader that does not know the chain fails on the file (no "B.*") instead of adding
        the correction to x."""
        return "Bpeek" if group == "B" and self.peek else group

    def param_groups(self) -> tuple[str, ...]:
        """Names of the parameter dicts this adapter set has: A, B[, P, Q][, U, V][, XA[, XP, XQ], XH]
        (file tensor prefixes, `_file_prefix`)."""
        return (("A", "B") + (("P", "Q") if self.context else ()) + (("U", "V") if self.expert_rank else ())
                + ((("XA", "XP", "XQ") if self.context else ("XA",)) + ("XH",) if self.cross_heads else ()))

    def accelerate(self, layer: int, d: int, x: torch.Tensor, prev: torch.Tensor | None = None,
                   base: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H] (residual entering layer's MoE) -> r [N, H], the predicted residual of layer+d.
        prev [N, 2H]: each row's context (`context_rows`), needed with P and Q.
        base [N, H]: what the correction is added to (default x; the chain's s_d with attention peek)."""
        key = f"{layer}_{d}"
        xf = x.float()
        a = F.linear(_rms(xf), self.A[key])  # [N, R]
        if self.context:
            if prev is None:
                raise MoeOffloadError("these adapters read the previous positions: pass prev=context_rows(x)[0]")
            h = self.hidden
            a = a + F.linear(_rms(prev[:, :h].float()), self.P[key]) + F.linear(_rms(prev[:, h:].float()), self.Q[key])
        return (xf if base is None else base) + F.linear(F.silu(a), self.B[key])

    def save(self, path: str | Path, meta: dict[str, Any]) -> None:
        tensors = {f"{self._file_prefix(n)}.{k}": p.detach().float().cpu().contiguous() for n in self.param_groups()
                   for k, p in getattr(self, n).items()}
        meta = {**meta, "lookaheads": self.lookaheads, "rank": self.rank, "hidden": self.hidden,
                "num_layers": self.num_layers}
        if self.context:
            meta["context"], meta["context_decay"] = True, CONTEXT_DECAY
        if self.cross_token:
            meta["cross_token"] = True
        if self.peek:
            meta["attention_peek"] = True
        if self.expert_rank or self.cross_heads:
            meta["num_experts"] = self.num_experts
        if self.expert_rank:
            meta["expert_rank"] = self.expert_rank
        if self.cross_heads:
            meta["cross_heads"] = True
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model: MoeModel) -> tuple["Accelerator", dict[str, Any]]:
        """Load adapters for `model`; a file trained for another model is a clear error."""
        path = Path(path)
        meta, tensors = _read_file(path)
        want = model_fingerprint(model)
        if meta.get("fingerprint") != want:
            raise MoeOffloadError(
                f"{path}: accelerator was trained for a different model (fingerprint {meta.get('fingerprint')}, "
                f"{meta.get('model', '?')}); this model's fingerprint is {want}. Train one for it with "
                "`moe-offload train-accelerator`")
        retired = [k for k in ("hint_experts", "gain") if meta.get(k)]
        if retired:
            raise MoeOffloadError(f"{path}: adapters with a router hint or norm gain ({', '.join(retired)}) are no longer "
                                  "read (they measured +0.000 recall and were retired); train new ones with "
                                  "`moe-offload train-accelerator`")
        try:
            acc = cls(int(meta["hidden"]), int(meta["num_layers"]), [int(d) for d in meta["lookaheads"]],
                      int(meta["rank"]), context=bool(meta.get("context", False)),
                      cross_token=bool(meta.get("cross_token", False)),
                      peek=bool(meta.get("attention_peek", False)), expert_rank=int(meta.get("expert_rank", 0)),
                      num_experts=int(meta.get("num_experts", 0)), cross_heads=bool(meta.get("cross_heads", False)))
            if acc.context and float(meta.get("context_decay", CONTEXT_DECAY)) != CONTEXT_DECAY:
                raise ValueError(f"context_decay {meta['context_decay']} (this version reads {CONTEXT_DECAY})")
            # Only the prefetch adapters ("A.*", "B.*", optional "P.*", "Q.*", "U.*", "V.*", "X*.*"); other tensors
            # (the draft head) are not ours. Files without P/Q have none of them and load as before.
            prefixes = {f"{acc._file_prefix(n)}.": f"{n}." for n in acc.param_groups()}
            acc.load_state_dict({prefixes[k.split(".", 1)[0] + "."] + k.split(".", 1)[1]: v
                                 for k, v in tensors.items() if k.split(".", 1)[0] + "." in prefixes})
        except MoeOffloadError as exc:
            raise MoeOffloadError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MoeOffloadError(f"{path}: accelerator metadata disagrees with its tensors "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        if (acc.expert_rank or acc.cross_heads) and acc.num_experts != model.cfg.num_local_experts:
            raise MoeOffloadError(f"{path}: expert stand-ins / cross heads are for {acc.num_experts} experts; the model has "
                                  f"{model.cfg.num_local_experts}")
        if acc.hidden != model.cfg.hidden_size or acc.num_layers != model.cfg.num_moe_layers:
            raise MoeOffloadError(f"{path}: adapters are for hidden {acc.hidden} x {acc.num_layers} layers; the model "
                                  f"has {model.cfg.hidden_size} x {model.cfg.num_moe_layers}")
        return acc.to(model.device), meta


def m2r2_lookahead(acc: Accelerator, asked: int | None, default: int, source: str | Path, chosen: bool = True) -> int:
    """How far m2r2 adapters predict: `asked` when given (refused past the adapters' range if the user
    chose them); unasked, cross-token adapters reach as far as they were trained to see, others use
    `default` within their range. `source` names the file in the error."""
    top = max(acc.lookaheads)
    if asked is None:
        return top if acc.cross_token else min(default, top)
    if asked > top and chosen:
        raise MoeOffloadError(f"lookahead {asked}: the m2r2 adapters in {source} were trained for lookaheads "
                              f"{acc.lookaheads}; ask for at most {top} or train adapters with "
                              f"`moe-offload train-accelerator --lookahead 1,...,{asked}`")
    return min(asked, top)


def _shared(params: nn.ParameterDict, keys: list[str], stacked: torch.Tensor, part: Any) -> torch.Tensor:
    """Re-point each params[keys[i]] at part(stacked, i), its slice of the stack built from them, so the
    weights are held once. A parameter of another dtype or device than the stack keeps its own copy."""
    for i, k in enumerate(keys):
        p = params[k]
        if p.dtype == stacked.dtype and p.device == stacked.device:
            view = part(stacked, i)
            assert view.shape == p.shape, (k, view.shape, p.shape)
            p.data = view  # the same Parameter object: an optimizer holding it keeps training it
    return stacked


def choice_scores(model: MoeModel, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Router logits [..., E] float32 of target layers -> scores whose top-k is the set the family's
    router picks (`Routing.choice_scores`): the softmax (bit for bit as before, for the softmax
    families), or the sigmoid plus the targets' correction bias `bias` [..., 1, E] (`_biases`) with the
    experts outside the best groups at -inf (GLM-4.5)."""
    if model.cfg.scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    return model.routing.choice_scores(logits, bias)


def _biases(model: MoeModel, targets: list[int]) -> torch.Tensor | None:
    """The target layers' correction biases stacked [n, 1, E] float32, or None (a router without one)."""
    if model.moe_layers[targets[0]].router_bias is None:
        return None
    return torch.stack([model.moe_layers[t].router_bias.float() for t in targets])[:, None]


def _gate_biases(model: MoeModel, targets: list[int]) -> torch.Tensor | None:
    """The target layers' router linear biases stacked [n, 1, E] float32, or None (routers without one)."""
    if model.moe_layers[targets[0]].gate_bias is None:
        return None
    return torch.stack([model.moe_layers[t].gate_bias.float() for t in targets])[:, None]


class M2R2Predictor:
    """Layer l+d's norm and router applied to the accelerated residual r_{l,d}(x), its scores ranked as
    that router chooses (`choice_scores`: the softmax, or the sigmoid plus the correction bias within
    the best groups)."""

    name = "m2r2"

    def __init__(self, model: MoeModel, accelerator: Accelerator, lookahead: int | None = None):
        self.model, self.acc = model, accelerator
        self.lookahead = lookahead or max(accelerator.lookaheads)
        self.cross_token = accelerator.cross_token  # rows past the last layer: later tokens' layers
        missing = [d for d in range(1, self.lookahead + 1) if d not in accelerator.lookaheads]
        if missing:
            raise MoeOffloadError(f"accelerator has lookaheads {accelerator.lookaheads}; lookahead "
                                  f"{self.lookahead} needs every d in [1, {self.lookahead}] ({len(missing)} missing)")
        self.first = FirstLayerTable(model, self.lookahead)
        self._stacks: dict[int, dict[str, torch.Tensor] | None] = {}  # per layer, built on first use
        # With context adapters: per layer, the last chunk seen (x, start, its context rows) and the
        # position after it with the context state there, so the next chunk continues from it.
        self._chunk: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._last: dict[int, tuple[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(self, layer: int, x: torch.Tensor, start_pos: Any) -> None:
        """Every residual x [N, H] entering layer's MoE (prefill chunks and decode steps, in order):
        remembered for the context adapters' previous-row input. A no-op without them, and at the last
        layer unless the adapters are cross-token (otherwise none starts there)."""
        if self.acc.context and (self.cross_token or layer + 1 < self.model.cfg.num_moe_layers):
            self._previous(layer, x, start_pos)

    def _previous(self, layer: int, x: torch.Tensor, start_pos: Any) -> torch.Tensor:
        """[N, 2H]: each row's context at `layer` (`context_rows`; zero where unknown: position 0, a gap
        since the last chunk, or batched rows at their own positions)."""
        if not isinstance(start_pos, int):
            return torch.zeros(x.shape[0], 2 * x.shape[1], dtype=torch.float32, device=x.device)
        hit = self._chunk.get(layer)
        if hit is not None and hit[0] is x and hit[1] == start_pos:
            return hit[2]
        last = self._last.get(layer)
        state = last[1] if last is not None and start_pos > 0 and last[0] == start_pos else None
        ctx, after = context_rows(x, state)  # [N, 2H]
        self._chunk[layer] = (x, start_pos, ctx)
        self._last[layer] = (start_pos + x.shape[0], after)
        return ctx

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        return self.first.top(token_id, take)

    def scores(self, layer: int, x: torch.Tensor, start_pos: int = 0, history: tuple | None = None) -> torch.Tensor:
        """[N, D, E]: row d-1 scores layer l+d (a later token's layer with cross-token adapters; NaN
        where no adapter reaches). All of a layer's adapters run stacked: one matmul per adapter part
        and one batched router, whatever D (a cross-token lookahead of 2L rows costs what 1 did).
        Attention-peek adapters read earlier positions' keys from `history` = (cache, position of x's
        first row, real_until) (`peek.peek_attention`); by default the cache of the forward
        pass in progress at start_pos, which holds the real keys of every position before it."""
        m = self.model
        N, E = x.shape[0], m.cfg.num_local_experts
        out = torch.full((N, self.lookahead, E), float("nan"), device=x.device)
        st = self._stacks[layer] if layer in self._stacks else self._stack(layer)
        if st is None:  # no adapter starts at this layer
            return out
        prev = self._previous(layer, x, start_pos) if self.acc.context else None  # [N, 2H]
        if st["ds"]:
            out[:, st["rows"]] = self._residual_rows(st, layer, x, prev, start_pos, history)
        if st["hds"]:  # cross heads: the target routers on x plus each row's head on the shared trunk
            h = self.acc.trunk(layer, x, prev)  # [N, R]
            unit = rms_norm(x, torch.ones_like(x[0]), m.cfg.rms_norm_eps)  # [N, H]: normalised once for all rows
            normed = st["Wh"] * unit  # [n, N, H]: each target layer's norm weight (rms_norm's own order)
            logits = torch.bmm(normed, st["Gh"]).float() + torch.einsum("nr,ier->ine", h, st["XH"])  # [n, N, E]
            if st["hgbias"] is not None:
                logits = logits + st["hgbias"]
            out[:, st["hrows"]] = choice_scores(m, logits, st["hbias"]).transpose(0, 1)
        return out

    def _residual_rows(self, st: dict, layer: int, x: torch.Tensor, prev: torch.Tensor | None, start_pos: Any,
                       history: tuple | None) -> torch.Tensor:
        """[N, n, E]: the residual adapters' rows (scores)."""
        m = self.model
        N, n, R = x.shape[0], st["rows"].numel(), self.acc.rank
        xf = x.float()
        a = F.linear(_rms(xf), st["A"])  # [N, n*R]
        if self.acc.context:
            h = self.acc.hidden
            a = a + F.linear(_rms(prev[:, :h]), st["P"]) + F.linear(_rms(prev[:, h:]), st["Q"])
        h_ = F.silu(a).view(N, n, R).transpose(0, 1)  # [n, N, R]
        r = xf[None] + torch.bmm(h_, st["Bt"])  # [n, N, H]: accelerated residuals, float32
        if st["peek"]:  # within-token rows start from the chain through the real attention, not from x
            cache, pos, real_until = history if history is not None else (m.active_cache, start_pos, None)
            chain = self.acc.chain(m, layer, x, max(st["ds"]), pos, cache, real_until)  # s_1.. [N, H] each
            r = torch.stack([r[i] + (chain[d - 1] - xf if self.acc.peeks(layer, d) else 0)
                             for i, d in enumerate(st["ds"])])  # [n, N, H]
        normed = rms_norm(r.to(x.dtype), st["W"], m.cfg.rms_norm_eps)  # [n, N, H]
        logits = torch.bmm(normed, st["Gt"]).float()  # [n, N, E]
        if st["gbias"] is not None:  # the routers' own linear bias (GPT-OSS)
            logits = logits + st["gbias"]
        return choice_scores(m, logits, st["bias"]).transpose(0, 1)

    @torch.no_grad()
    def _stack(self, layer: int) -> dict[str, Any] | None:
        """Layer's adapters for rows d = 1..lookahead stacked once: A, P, Q [n*R, .], B^T [n, R, H],
        target norm weights W [n, 1, H], routers G^T [n, H, E] in the model's dtype; cross heads:
        XH [n', E, R] with their targets' Wh, Gh. The adapter tensors become views of the stacks
        (`_shared`): one copy in memory, and in-place changes to A, B, P, Q, XH reach the predictor
        built last on these adapters (an earlier one keeps its own stacks from then on)."""
        m, acc = self.model, self.acc
        ds = [d for d in range(1, self.lookahead + 1) if f"{layer}_{d}" in acc.A]  # the residual pairs it has
        hds = [d for d in range(1, self.lookahead + 1) if acc.cross_heads and f"{layer}_{d}" in acc.XH]
        if not ds and not hds:
            self._stacks[layer] = None
            return None
        st: dict[str, Any] = {"ds": ds, "hds": hds}
        if ds:
            keys = [f"{layer}_{d}" for d in ds]
            targets = [acc.target(layer, d)[1] for d in ds]
            cat = lambda name: _shared(getattr(acc, name), keys, torch.cat([getattr(acc, name)[k].float() for k in keys]),  # noqa: E731
                                       lambda t, i: t[i * acc.rank:(i + 1) * acc.rank])
            st.update({"rows": torch.tensor([d - 1 for d in ds], device=m.device), "A": cat("A"),
                       "peek": any(acc.peeks(layer, d) for d in ds),
                       "Bt": _shared(acc.B, keys, torch.stack([acc.B[k].float().t() for k in keys]).contiguous(),
                                     lambda t, i: t[i].t()),
                       "W": torch.stack([m.moe_layers[t].post_attention_layernorm for t in targets])[:, None],
                       "Gt": torch.stack([m.moe_layers[t].gate.t() for t in targets]).contiguous(),
                       "bias": _biases(m, targets), "gbias": _gate_biases(m, targets)})
            if acc.context:
                st["P"], st["Q"] = cat("P"), cat("Q")
        if hds:
            targets = [acc.target(layer, d)[1] for d in hds]
            st.update({"hrows": torch.tensor([d - 1 for d in hds], device=m.device),
                       "XH": _shared(acc.XH, [f"{layer}_{d}" for d in hds],  # [n', E, R]
                                     torch.stack([acc.XH[f"{layer}_{d}"].float() for d in hds]), lambda t, i: t[i]),
                       "Wh": torch.stack([m.moe_layers[t].post_attention_layernorm for t in targets])[:, None],
                       "Gh": torch.stack([m.moe_layers[t].gate.t() for t in targets]).contiguous(),
                       "hbias": _biases(m, targets), "hgbias": _gate_biases(m, targets)})
        self._stacks[layer] = st
        return st
