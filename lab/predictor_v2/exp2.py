"""Probes beyond the library adapter (not shipped): deeper adapter, previous-token context, post-MoE input.
Same loss as adapter_loss (KL + 0.1 align + rank loss), same data, same eval."""
import argparse, json, time, os, math
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
import moe_offload
from moe_offload.model.layers import rms_norm
from moe_offload.predict.train import true_router_probs, topk_ranking_loss, ALIGN_WEIGHT

ap = argparse.ArgumentParser()
ap.add_argument("--name", required=True)
ap.add_argument("--mode", choices=["deep", "prev", "post", "ema"], required=True)
ap.add_argument("--rank", type=int, default=128)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--lr", type=float, default=3e-3)
a = ap.parse_args()
model = moe_offload.load(None, device="cpu", offload=False); m = model.model
L, E, k, H, eps = m.cfg.num_hidden_layers, m.cfg.num_local_experts, m.cfg.num_experts_per_tok, m.cfg.hidden_size, m.cfg.rms_norm_eps
pairs = [(l, d) for l in range(L) for d in (1, 2, 3) if l + d < L]
R = a.rank
def rms(x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
class Ad(nn.Module):
    def __init__(s):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        nin = {"prev": 2, "ema": 3}.get(a.mode, 1)
        s.A = nn.Parameter(torch.randn(R, nin * H, generator=g) / math.sqrt(nin * H))
        s.B = nn.Parameter(torch.zeros(H, R))
        if a.mode == "deep":
            s.M = nn.Parameter(torch.randn(R, R, generator=g) / math.sqrt(R))
    def forward(s, x, xp):
        z = rms(x) if a.mode not in ("prev", "ema") else torch.cat([rms(x), rms(xp[..., :H])] + ([rms(xp[..., H:])] if a.mode == "ema" else []), -1)
        h = F.silu(F.linear(z, s.A))
        if a.mode == "deep":
            h = h + F.silu(F.linear(h, s.M))
        return x + F.linear(h, s.B)
ads = nn.ModuleDict({f"{l}_{d}": Ad() for l, d in pairs})
opt = torch.optim.Adam(ads.parameters(), lr=a.lr)
def src(c, i):
    mid = c["mid"][i]
    x = c["post"][i] if a.mode == "post" else mid
    xp = torch.cat([torch.zeros_like(mid[:1]), mid[:-1]])  # previous position's residual (0 at window start)
    if a.mode == "ema":  # plus a decayed mean of all earlier positions' residuals (0.8 per step)
        T_ = mid.shape[0]; i_ = torch.arange(T_)
        diff = (i_[:, None] - 1 - i_[None, :]).float()
        W = torch.where(diff >= 0, 0.2 * 0.8 ** diff.clamp_min(0), torch.zeros(()))  # [T, T]
        e = torch.einsum("ij,jlh->ilh", W, mid)
        xp = torch.cat([xp, e], -1)
    return mid, x, xp
def logits(l, d, x, xp):
    t = l + d
    r = ads[f"{l}_{d}"](x[:, l], xp[:, l])
    return r, F.linear(rms_norm(r, m.layers[t].post_attention_layernorm, eps), m.layers[t].gate)
tr = torch.load("scratch/train.pt")
if a.mode == "post":  # need post residuals for train: recompute cheaply
    import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); from cache import run
    ids = model.encode_text(open("scratch/train.txt", encoding="utf-8").read())[:400000]
    tr["mid"], tr["post"] = run(model, ids[:360000])
@torch.no_grad()
def evaluate(split):
    c = torch.load(f"scratch/{split}.pt"); hits = {}; tot = {}; res = {}
    for i in range(len(c["mid"])):
        mid, x, xp = src(c, i)
        true = true_router_probs(m, mid).topk(k, -1).indices
        for l, d in pairs:
            top = logits(l, d, x, xp)[1].topk(k, -1).indices
            h = (true[:, l + d, :, None] == top[:, None, :]).any(-1).sum().item()
            key = f"l{l}_d{d}"; hits[key] = hits.get(key, 0) + h; tot[key] = tot.get(key, 0) + top.numel()
    for key in hits: res[key] = hits[key] / tot[key]
    for d in (1, 2, 3):
        ks = [kk for kk in hits if kk.endswith(f"d{d}")]
        res[f"d{d}"] = sum(hits[kk] for kk in ks) / sum(tot[kk] for kk in ks)
    return res
g = torch.Generator().manual_seed(0); t0 = time.time(); curve = []
for ep in range(a.epochs):
    for i in torch.randperm(len(tr["mid"]), generator=g).tolist():
        mid, x, xp = src(tr, i)
        probs = true_router_probs(m, mid)
        total = 0.0
        for l, d in pairs:
            r, lg = logits(l, d, x, xp); p = probs[:, l + d]
            kl = (p * (p.clamp_min(1e-12).log() - F.log_softmax(lg, -1))).sum(-1).mean()
            total = total + kl + ALIGN_WEIGHT * (1 - F.cosine_similarity(r, mid[:, l + d], dim=-1).mean()) + topk_ranking_loss(lg, p, k)
        loss = total / len(pairs)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    r = evaluate("held"); curve.append({"epoch": ep + 1, **{d: round(r[d], 4) for d in ("d1", "d2", "d3")}})
    print(a.name, curve[-1], f"{time.time()-t0:.0f}s", flush=True)
out = {"name": a.name, "args": vars(a), "curve": curve, "held": evaluate("held"), "kjv": evaluate("kjv"), "seconds": time.time() - t0}
print(a.name, "held", {d: round(out["held"][d], 4) for d in ("d1", "d2", "d3")}, "kjv", {d: round(out["kjv"][d], 4) for d in ("d1", "d2", "d3")}, flush=True)
json.dump(out, open(f"scratch/runs/{a.name}.json", "w"), indent=1)
