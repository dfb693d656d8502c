"""Cross-token rows: per-(l,d) accelerated-residual adapters (the library's form) vs a shared per-layer
trunk with per-(l,d) logit heads [E, R] (parameters ~ L*3RH + L*D*E*R instead of L*D*4RH).
Cached residuals from the previous session (scratch/{train,held}.pt: residual entering each layer's
MoE, windows of 256). Trains only the cross-token pairs (l + d >= L), d = 1..12; reports held-out recall."""
import sys, time, json
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2)
import moe_offload
from moe_offload.predict import Accelerator
from moe_offload.predict.accelerator import context_rows, _rms
from moe_offload.predict.train import adapter_loss, true_router_probs, topk_ranking_loss
from moe_offload.model.layers import rms_norm

R, D, WINDOWS, EPOCHS = 64, 12, int(sys.argv[1]) if len(sys.argv) > 1 else 300, 1
model = moe_offload.load(None, device="cpu", offload=False); m = model.model
L, E, k, H, eps = m.cfg.num_hidden_layers, m.cfg.num_local_experts, m.cfg.num_experts_per_tok, m.cfg.hidden_size, m.cfg.rms_norm_eps
train = torch.load("scratch/train.pt")["mid"][:WINDOWS]
held = torch.load("scratch/held.pt")["mid"][:60]
cross = [(l, d) for l in range(L) for d in range(1, D + 1) if l + d >= L]

class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(L, R, H, generator=g) / H ** 0.5)
        self.P = nn.Parameter(torch.zeros(L, R, H)); self.Q = nn.Parameter(torch.zeros(L, R, H))
        self.Hd = nn.ParameterDict({f"{l}_{d}": nn.Parameter(torch.zeros(E, R)) for l, d in cross})
    def logits(self, l, d, x, ctx):
        q, t = divmod(l + d, L)
        h = F.silu(F.linear(_rms(x), self.A[l]) + F.linear(_rms(ctx[:, :H]), self.P[l]) + F.linear(_rms(ctx[:, H:]), self.Q[l]))
        base = F.linear(rms_norm(x, m.layers[t].post_attention_layernorm.float(), eps), m.layers[t].gate.float())
        return base + F.linear(h, self.Hd[f"{l}_{d}"])

def heads_loss(mod, xs, probs):
    tot, n = 0.0, 0
    ctx = {l: context_rows(xs[:, l])[0] for l in range(L)}
    for l, d in cross:
        q, t = divmod(l + d, L); N = xs.shape[0] - q
        lg = mod.logits(l, d, xs[:N, l], ctx[l][:N]); p = probs[q:, t]
        kl = (p * (p.clamp_min(1e-12).log() - F.log_softmax(lg, -1))).sum(-1).mean()
        tot = tot + kl + topk_ranking_loss(lg, p, k); n += 1
    return tot / n

@torch.no_grad()
def recall(score_fn):
    hits = {d: [0, 0] for d in range(1, D + 1)}
    for xs in held:
        xs = xs.float(); probs = true_router_probs(m, xs); true = probs.topk(k, -1).indices
        ctx = {l: context_rows(xs[:, l])[0] for l in range(L)}
        for l, d in cross:
            q, t = divmod(l + d, L); N = xs.shape[0] - q
            top = score_fn(l, d, xs[:N, l], ctx[l][:N]).topk(k, -1).indices
            hits[d][0] += (true[q:, t, :, None] == top[:, None, :]).any(-1).sum().item(); hits[d][1] += top.numel()
    return {d: round(h / n, 3) for d, (h, n) in hits.items()}

def fit(mod, loss_fn):
    opt = torch.optim.Adam(mod.parameters(), lr=3e-3); g = torch.Generator().manual_seed(0); t0 = time.time()
    for _ in range(EPOCHS):
        for i in torch.randperm(len(train), generator=g).tolist():
            xs = train[i].float(); probs = true_router_probs(m, xs)
            loss = loss_fn(mod, xs, probs); opt.zero_grad(); loss.backward(); opt.step()
    return time.time() - t0

acc = Accelerator(H, L, list(range(1, D + 1)), R, 0, context=True, cross_token=True)
acc.pairs = cross  # train the cross rows only
def acc_score(l, d, x, ctx):
    q, t = divmod(l + d, L)
    r = acc.accelerate(l, d, x, None, ctx)
    return F.linear(rms_norm(r, m.layers[t].post_attention_layernorm.float(), eps), m.layers[t].gate.float())
res = {}
res["untrained (next-gate on x, target router)"] = recall(acc_score)
s = fit(acc, lambda mod, xs, probs: adapter_loss(m, mod, xs, probs, 1.0))
n_acc = sum(p.numel() for n, p in acc.named_parameters() if any(n.endswith(f"{l}_{d}") for l, d in cross))
res[f"per-pair residual adapters ({n_acc} params, {s:.0f} s)"] = recall(acc_score)
heads = Heads()
s = fit(heads, heads_loss)
res[f"shared trunk + logit heads ({sum(p.numel() for p in heads.parameters())} params, {s:.0f} s)"] = recall(heads.logits)
for kk, v in res.items():
    print(kk, v, flush=True)
json.dump({"windows": WINDOWS, "rank": R, "results": {kk: {str(d): r for d, r in v.items()} for kk, v in res.items()}},
          open("scratch/cross_heads.json", "w"), indent=1)
