"""Train M2R2 accelerator adapters on a frozen model, streaming over a text with bounded memory."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.layers import rms_norm
from ..model.observers import Observer, observing
from ..errors import MoeOffloadError
from ..model.transformer import KVCache, MoeModel
from .accelerator import Accelerator, M2R2Predictor, context_rows
from .predictors import NextGate, router_probs

ALIGN_WEIGHT = 0.1
# The sigmoid router's corrected scores sigmoid(z) + bias differ by < 1 between experts; the ranking term
# (topk_ranking_loss) reads them scaled by this. On a tiny random GLM-4.5-shaped model (128 experts
# top-8, 8 groups, best 4) scales 1, 3 and 10 gave the same held-out recall within 0.01 at d=1-3 and
# 30-100 lost up to 0.04 at d=3; against no ranking term, 10 measured -0.004/+0.008/+0.008 at d=1/2/3.
SIGMOID_RANK_SCALE = 10.0


def collect_residuals(model: MoeModel, ids: list[int]) -> torch.Tensor:
    """Residual entering every layer's MoE for one window of tokens: [T, L, H] float32."""
    return collect_window(model, ids)[0]


def collect_window(model: MoeModel, ids: list[int], expert_outputs: bool = False
                   ) -> tuple[torch.Tensor, KVCache] | tuple[torch.Tensor, KVCache, torch.Tensor]:
    """collect_residuals plus the window's KV cache (the real keys and values of every layer at positions
    0..T-1, what attention-peek adapters read), and with expert_outputs the routed experts' output of
    every layer [T, L, H] float32 (what expert stand-ins are fitted to)."""
    xs = torch.empty(len(ids), model.cfg.num_moe_layers, model.cfg.hidden_size, device=model.device)
    cache = KVCache(model.cfg, 1, len(ids), model.dtype, model.device)

    class Residuals(Observer):
        steers_routing = False

        def on_residual(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
            xs[:, layer] = x.float()

    with observing(model, Residuals()), torch.inference_mode():
        model(torch.tensor([ids], device=model.device), 0, cache)
    kept = KVCache.__new__(KVCache)  # clones: out of inference mode, usable as (constant) training input
    kept.k, kept.v, kept.max_seq_len = cache.k.clone(), cache.v.clone(), cache.max_seq_len
    if not expert_outputs:
        return xs.clone(), kept
    out = torch.empty_like(xs)
    with torch.inference_mode():
        for l, w in enumerate(model.moe_layers):  # MoE layers only (a dense first layer has no router)
            n = rms_norm(xs[:, l].to(model.dtype), w.post_attention_layernorm, model.cfg.rms_norm_eps)
            weights, top = model.route(l, model.router_logits(l, n))
            out[:, l] = model.experts(l, n, top, weights).float()
    return xs.clone(), kept, out.clone()


def true_router_probs(model: MoeModel, xs: torch.Tensor) -> torch.Tensor:
    """[T, L, E]: each layer's router distribution on its own residual (a top-k-then-softmax router,
    GPT-OSS's, ranks by its logits: their softmax over all experts is the distribution, same ranking)."""
    eps = model.cfg.rms_norm_eps
    probs = torch.stack([router_probs(model, l, rms_norm(xs[:, l].to(model.dtype), model.moe_layers[l].post_attention_layernorm, eps))
                         for l in range(xs.shape[1])], dim=1)
    return torch.softmax(probs, dim=-1) if model.cfg.scoring == "topk_softmax" else probs


def topk_ranking_loss(logits: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Each true top-k expert's logit above the strongest expert outside the true top-k:
    mean softplus(max_{j not in S} z_j - z_i) over i in S. logits, probs [T, E].

    Against the strongest outsider, not the log-sum-exp of all outsiders: the LSE grows with the number
    of experts (by up to log(E - k)), so at 128 experts top-8 it asked for margins the router's logits
    cannot give and training made recall worse than next-gate (0.716 vs 0.777 at d=1; this form 0.850)."""
    top = probs.topk(k, dim=-1).indices  # [T, k]
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    rest = logits.masked_fill(inside, float("-inf")).amax(dim=-1, keepdim=True)  # [T, 1]
    return F.softplus(rest - logits.gather(1, top)).mean()


def sigmoid_distillation(logits: torch.Tensor, true_logits: torch.Tensor) -> torch.Tensor:
    """A sigmoid router's distillation: each expert's score sigmoid(z) is its own Bernoulli, so the loss
    is KL(Bernoulli(sigmoid(z_true)) || Bernoulli(sigmoid(z))) summed over the experts, averaged over rows.
    logits, true_logits [n, E]. (The correction bias is the target layer's constant: matching the scores
    matches the corrected scores it ranks, groups included.)"""
    p = torch.sigmoid(true_logits)
    return (F.binary_cross_entropy_with_logits(logits, p, reduction="none")
            - F.binary_cross_entropy_with_logits(true_logits, p, reduction="none")).sum(-1).mean()


def adapter_loss(model: MoeModel, acc: Accelerator, xs: torch.Tensor, probs: torch.Tensor,
                 rank_weight: float = 0.0, cache: KVCache | None = None,
                 expert_out: torch.Tensor | None = None) -> torch.Tensor:
    """Router distillation KL(p_true(l+d) || p(r)) plus ALIGN_WEIGHT * (1 - cos(r, x_{l+d})), plus
    rank_weight * topk_ranking_loss (the set the router will pick, not only its distribution), averaged.
    A sigmoid router (GLM-4.5) is distilled per expert (`sigmoid_distillation`) and its ranking term
    reads the bias-corrected scores sigmoid(z) + bias (times SIGMOID_RANK_SCALE) against the routed set
    (probs: `true_router_probs`, whose top-k is that set, groups included).
    Attention-peek adapters need the window's cache (`collect_window`): their r starts from the chain
    through the real attention over the real earlier keys, as decode computes it; expert stand-ins add
    `stand_in_loss` against expert_out."""
    if acc.peek and cache is None:
        raise MoeOffloadError("adapter_loss: attention-peek adapters need the window's KV cache (collect_window)")
    eps = model.cfg.rms_norm_eps
    k = model.cfg.num_experts_per_tok
    T = xs.shape[0]
    total, terms = 0.0, 0
    sigmoid = model.cfg.scoring == "sigmoid"
    true_logits: dict[tuple[int, int], torch.Tensor] = {}  # (q, t) -> [n, E]: the sigmoid router's targets
    ctx = {l: context_rows(xs[:, l])[0] for l in {l for l, _ in acc.pairs}} if acc.context else {}  # [T, 2H]
    # decode's view: each row sees the real keys before it, its own estimated one
    chains = {l: acc.chain(model, l, xs[:, l], max(acc.lookaheads), 0, cache, real_until=T)
              for l in range(model.cfg.num_moe_layers - 1)} if acc.peek else {}
    for l, d in acc.pairs:
        q, t = acc.target(l, d)  # cross-token pairs: position p predicts layer t of position p + q
        n = T - q
        if n <= 0:
            continue
        prev = ctx[l][:n] if acc.context else None  # [n, 2H]: the window starts at position 0
        p = probs[q:, t]  # [n, E]
        if acc.is_head(l, d):  # a logit head on the layer's trunk: no residual to align
            logits = acc.head_logits(model, l, d, xs[:n, l], prev)  # [n, E]
            align = 0.0
        else:
            base = chains[l][d - 1] if acc.peeks(l, d) else None  # [n, H]: through the real attention
            r = acc.accelerate(l, d, xs[:n, l], prev, base)  # [n, H]
            w = model.moe_layers[t].post_attention_layernorm.float()  # [H]
            logits = F.linear(rms_norm(r, w, eps), model.moe_layers[t].gate.float(), _float(model.moe_layers[t].gate_bias))
            align = 1 - F.cosine_similarity(r, xs[q:, t], dim=-1).mean()
        if sigmoid:  # the sigmoid router: its per-expert scores, ranked with the target's correction bias
            if (q, t) not in true_logits:
                w = model.moe_layers[t].post_attention_layernorm.float()
                true_logits[(q, t)] = F.linear(rms_norm(xs[q:, t], w, eps), model.moe_layers[t].gate.float(),
                                               _float(model.moe_layers[t].gate_bias))
            kl = sigmoid_distillation(logits, true_logits[(q, t)])
            bias = model.moe_layers[t].router_bias
            corrected = torch.sigmoid(logits) + (bias.float() if bias is not None else 0.0)  # [n, E]
            ranked = SIGMOID_RANK_SCALE * corrected
        else:
            logq = F.log_softmax(logits, dim=-1)
            kl = (p * (p.clamp_min(1e-12).log() - logq)).sum(-1).mean()
            ranked = logits
        total = total + kl + ALIGN_WEIGHT * align
        terms += 1
        if rank_weight:
            total = total + rank_weight * topk_ranking_loss(ranked, p, k)
    total = total / max(1, terms)
    if acc.expert_rank:
        total = total + stand_in_loss(model, acc, xs, expert_out)
    return total


def stand_in_loss(model: MoeModel, acc: Accelerator, xs: torch.Tensor, expert_out: torch.Tensor | None
                  ) -> torch.Tensor:
    """Mean over layers of the expert stand-ins' squared error against the real routed experts' output
    expert_out [T, L, H] (`collect_window(..., expert_outputs=True)`), relative to its mean square."""
    if expert_out is None:
        raise MoeOffloadError("adapter_loss: expert stand-ins are fitted to the experts' output: pass "
                              "expert_out from collect_window(..., expert_outputs=True)")
    layers = range(model.cfg.num_moe_layers - 1)
    errs = [F.mse_loss(acc.stand_in(model, l, xs[:, l]), expert_out[:, l]) / expert_out[:, l].pow(2).mean().clamp_min(1e-12)
            for l in layers]
    return torch.stack(errs).mean()


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


@torch.no_grad()
def evaluate(model: MoeModel, acc: Accelerator, ids: list[int], window: int) -> dict[str, Any]:
    """Held-out adapter loss and recall@d (top-k exact and top-(k+1)) for next-gate (both variants)
    and m2r2: the fraction of the true top-k experts of layer l+d found in the predicted set. With
    cross-token adapters also "d{d}-later" (the rows landing in a later token), beside "repeat": the
    current token's experts at that layer, for d <= L."""
    k, L = model.cfg.num_experts_per_tok, model.cfg.num_moe_layers
    D = max(acc.lookaheads)
    preds = {"next-gate": NextGate(model, D, "residual"), "next-gate-normed": NextGate(model, D, "normed"),
             "m2r2": M2R2Predictor(model, acc, D)}
    cells = [(d, later) for d in range(1, D + 1) for later in (False, True) if not later or acc.cross_token]
    names = (*preds, "repeat")
    hits = {(n, c, extra): 0.0 for n in names for c in cells for extra in (0, 1)}
    count = {(n, c): 0 for n in names for c in cells}
    loss, n_windows = 0.0, 0
    for w in windows(ids, window):
        xs, cache, *out = collect_window(model, w, expert_outputs=bool(acc.expert_rank))
        probs = true_router_probs(model, xs)  # [T, L, E]
        true = probs.topk(k, dim=-1).indices  # [T, L, k]
        loss += adapter_loss(model, acc, xs, probs, cache=cache, expert_out=out[0] if out else None).item()
        n_windows += 1
        for l in range(L):
            x = xs[:, l].to(model.dtype)
            scores = {name: pred.scores(l, x) for name, pred in preds.items() if name != "m2r2"}  # [T, D, E] each
            scores["m2r2"] = preds["m2r2"].scores(l, x, history=(cache, 0, x.shape[0]))  # decode's view
            for d in range(1, D + 1):
                q, t = divmod(l + d, L)
                n = x.shape[0] - q
                if n <= 0:
                    continue
                cand = {name: s[:n, d - 1] for name, s in scores.items() if not s[:n, d - 1].isnan().any()}
                if q and d <= L:  # this token's routing of layer t <= l (known by now), for the next one
                    cand["repeat"] = probs[:n, t]
                cell = (d, q > 0)
                if cell not in cells:
                    continue
                for name, s in cand.items():
                    count[(name, cell)] += n * k
                    for extra in (0, 1):
                        top = s.topk(k + extra, dim=-1).indices  # [n, k+extra]
                        hits[(name, cell, extra)] += (true[q:, t, :, None] == top[:, None, :]).any(-1).sum().item()
    recall = {name: {recall_label(*c): {"top_k": hits[(name, c, 0)] / count[(name, c)],
                                        "top_k_plus_1": hits[(name, c, 1)] / count[(name, c)]}
                     for c in cells if count[(name, c)]} for name in names}
    return {"loss": loss / max(1, n_windows), "recall": {n: r for n, r in recall.items() if r}, "tokens": len(ids)}


def recall_label(d: int, later: bool) -> str:
    """The report key of recall at lookahead d: "d{d}" for targets within the token (the recall the
    targets and earlier reports name), "d{d}-later" for the rows of cross-token adapters that land in a
    later token."""
    return f"d{d}-later" if later else f"d{d}"


def expert_rank_for(num_experts: int) -> int:
    """Rank of each expert's stand-in on the attention-peek chain: 512 / experts within 4..64 (64 for
    Mixtral's 8, 4 for 128), which bounds the stand-ins' size."""
    return max(4, min(64, 512 // num_experts))


def train_accelerator(model: MoeModel, ids: list[int], *, lookaheads: list[int], rank: int = 32,
                      epochs: int = 4, lr: float = 3e-3, window: int = 256, heldout_fraction: float = 0.1,
                      seed: int = 0, show_progress: bool = True, cross_token: bool = False,
                      peek: bool = False, rank_weight: float | None = None,
                      context: bool = True) -> tuple[Accelerator, dict[str, Any]]:
    """Train adapters on the first (1 - heldout_fraction) of `ids`, report on the rest.

    context: every adapter also reads the previous positions (Accelerator's context part: +0.015/+0.037/
    +0.060 held-out recall at d=1/2/3 on the bundled model; the CLI always trains it). cross_token: also the pairs past the last layer,
    trained on the next positions' routing, as logit heads on a shared trunk per layer. peek:
    within-token pairs run through the real attention of the layers they pass, with low-rank stand-ins
    of every layer's experts (`expert_rank_for`). rank_weight: the weight of the top-k ranking term
    added to the distillation loss; None = its measured default, 1 without peek (it helped there) and
    0 with it (it cost 0.03 recall at d=1-2)."""
    if model.cfg.scoring not in ("softmax", "sigmoid", "topk_softmax"):
        raise MoeOffloadError(f"train-accelerator: m2r2 adapters distil a softmax or sigmoid router; "
                              f"{model.cfg.model_type} routes by {model.cfg.scoring} (next-gate predicts it; m2r2 is "
                              "not supported yet)")
    t0 = time.time()
    split = int(len(ids) * (1 - heldout_fraction))
    train_ids, held_ids = ids[:split], ids[split:]
    E = model.cfg.num_local_experts
    expert_rank = expert_rank_for(E) if peek else 0
    if rank_weight is None:
        rank_weight = 0.0 if peek else 1.0
    acc = Accelerator(model.cfg.hidden_size, model.cfg.num_moe_layers, lookaheads, rank, seed, context=context,
                      cross_token=cross_token, peek=peek, expert_rank=expert_rank, num_experts=E,
                      cross_heads=cross_token).to(model.device)
    before = evaluate(model, acc, held_ids, window)
    opt = torch.optim.Adam(acc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    chunks = windows(train_ids, window)
    curve = []
    with tqdm(total=epochs * len(chunks), desc="training accelerator", unit="window",
              disable=not show_progress) as bar:
        for epoch in range(epochs):
            for i in torch.randperm(len(chunks), generator=g).tolist():
                # streamed: one window in memory at a time
                xs, cache, *out = collect_window(model, chunks[i], expert_outputs=bool(acc.expert_rank))
                probs = true_router_probs(model, xs)
                with torch.enable_grad():
                    loss = adapter_loss(model, acc, xs, probs, rank_weight, cache, out[0] if out else None)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            curve.append({"epoch": epoch + 1, "heldout_loss": evaluate(model, acc, held_ids, window)["loss"]})
    after = evaluate(model, acc, held_ids, window)
    report = {"train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "epochs": epochs, "rank": rank,
              "rank_loss_weight": rank_weight, "context": context, "cross_token": cross_token,
              "attention_peek": peek, "expert_rank": expert_rank, "cross_heads": cross_token,
              "lookaheads": acc.lookaheads, "lr": lr, "window": window, "heldout_before": before,
              "heldout_after": after, "curve": curve, "train_seconds": time.time() - t0}
    return acc, report


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    """A router's bias in float32 (None: the router has none)."""
    return None if t is None else t.float()
