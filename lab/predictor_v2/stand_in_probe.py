"""Probe: low-rank per-expert approximations of layer l's MoE output (fit by regression), then peek recall d=1."""
import sys, math, time, torch, numpy as np, torch.nn.functional as F, moe_offload
from moe_offload.predict.train import windows, collect_window, true_router_probs
from moe_offload.model.layers import rms_norm
from moe_offload.model.moe import route
torch.manual_seed(0); torch.set_num_threads(2)
model = moe_offload.load(None, device="cpu", offload=False); m = model.model
cfg = m.cfg; L, E, k, H, eps = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.rms_norm_eps
R = int(sys.argv[1]); NTRAIN = int(sys.argv[2])
train = model.encode_text(open("scratch/train.txt").read()[:1200000])[:NTRAIN]
held = model.encode_text(open(moe_offload.__path__[0] + "/assets/heldout_kjv.txt").read())
def moe_data(xs):
    out = []
    with torch.no_grad():
        for l in range(L):
            n = rms_norm(xs[:, l], m.layers[l].post_attention_layernorm, eps)
            w, ids = route(F.linear(n, m.layers[l].gate), k, cfg.norm_topk_prob)
            out.append((n, w, ids, m.moe_block(n, l)))
    return out
U = torch.nn.Parameter(torch.randn(L, E, R, H) / math.sqrt(H)); V = torch.nn.Parameter(torch.zeros(L, E, H, R))
def approx(l, n, w, ids):
    h = F.silu(torch.einsum("erh,th->ter", U[l], n))  # [T, E, R]
    y = torch.einsum("ehr,ter->teh", V[l], h)  # [T, E, H]
    wfull = torch.zeros(n.shape[0], E).scatter_(1, ids, w.float())
    return (wfull[..., None] * y).sum(1)
opt = torch.optim.Adam([U, V], lr=3e-3); t0 = time.time()
for ep in range(2):
    for w in windows(train, 256):
        xs, _ = collect_window(m, w); data = moe_data(xs)
        loss = sum(F.mse_loss(approx(l, *data[l][:3]), data[l][3]) / data[l][3].pow(2).mean() for l in range(L))
        opt.zero_grad(); loss.backward(); opt.step()
    print("epoch", ep, loss.item() / L, f"{time.time()-t0:.0f}s", flush=True)
hits = np.zeros((L, 3)); cnt = np.zeros(L)
with torch.no_grad():
    for w in windows(held, 256)[:40]:
        xs, cache = collect_window(m, w); data = moe_data(xs); probs = true_router_probs(m, xs); true = probs.topk(k, -1).indices
        for l in range(L - 1):
            for j, r in enumerate((xs[:, l], xs[:, l] + approx(l, *data[l][:3]), xs[:, l] + data[l][3])):
                s = r + m.peek_attention(l + 1, r[None], 0, cache, real_until=r.shape[0])[0]
                top = F.linear(rms_norm(s, m.layers[l + 1].post_attention_layernorm, eps), m.layers[l + 1].gate).topk(k, -1).indices
                hits[l, j] += (true[:, l + 1, :, None] == top[:, None]).any(-1).sum().item()
            cnt[l] += top.numel()
print("per layer d1: [mid+peek, mid+approx+peek, exact]")
for l in range(L - 1): print(l, (hits[l] / cnt[l]).round(3))
print("pooled", (hits[:L-1].sum(0) / cnt[:L-1].sum()).round(3))
