"""Train adapter variants on cached residuals (library Accelerator + adapter_loss), per-(l,d) held-out recall."""
import argparse, json, time, os
import torch
torch.set_num_threads(1)
import moe_offload
from moe_offload.predict import Accelerator, M2R2Predictor
from moe_offload.predict.train import adapter_loss, true_router_probs

ap = argparse.ArgumentParser()
ap.add_argument("--name", required=True)
ap.add_argument("--rank", type=int, default=128)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--rank-weight", type=float, default=1.0)
ap.add_argument("--hint", action="store_true")
ap.add_argument("--gain", action="store_true")
ap.add_argument("--context", action="store_true")
ap.add_argument("--extra", action="store_true", help="also train on the rest of the training text")
ap.add_argument("--max-windows", type=int, default=0)
ap.add_argument("--save", default=None)
ap.add_argument("--align", type=float, default=None)
ap.add_argument("--cosine", action="store_true", help="cosine lr decay to 0.1x")
a = ap.parse_args()

import moe_offload.predict.train as T
if a.align is not None:
    T.ALIGN_WEIGHT = a.align
model = moe_offload.load(None, device="cpu", offload=False); m = model.model
L, E, k = m.cfg.num_hidden_layers, m.cfg.num_local_experts, m.cfg.num_experts_per_tok
train = torch.load("scratch/train.pt")["mid"]
if a.extra:
    train = train + torch.load("scratch/extra.pt")["mid"]
if a.max_windows:
    train = train[: a.max_windows]
acc = Accelerator(m.cfg.hidden_size, L, [1, 2, 3], a.rank, 0, hint_experts=E if a.hint else 0, gain=a.gain, context=a.context)
opt = torch.optim.Adam(acc.parameters(), lr=a.lr)
import math
total_steps = a.epochs * len(train); step = 0
g = torch.Generator().manual_seed(0)

@torch.no_grad()
def evaluate(split):
    mid = torch.cat(torch.load(f"scratch/{split}.pt")["mid"])  # [T, L, H]
    probs = true_router_probs(m, mid)
    true = probs.topk(k, -1).indices
    pred = M2R2Predictor(m, acc, 3)
    res, tot = {}, {}
    for l in range(L - 1):
        s = pred.scores(l, mid[:, l])
        for d in (1, 2, 3):
            if l + d >= L: continue
            top = s[:, d - 1].topk(k, -1).indices
            h = (true[:, l + d, :, None] == top[:, None, :]).any(-1).sum().item()
            res[f"l{l}_d{d}"] = h / top.numel()
            tot.setdefault(d, [0, 0]); tot[d][0] += h; tot[d][1] += top.numel()
    for d, (h, n) in tot.items(): res[f"d{d}"] = h / n
    return res

t0 = time.time()
curve = []
for ep in range(a.epochs):
    for i in torch.randperm(len(train), generator=g).tolist():
        xs = train[i]
        probs = true_router_probs(m, xs)
        loss = adapter_loss(m, acc, xs, probs, a.rank_weight)
        if a.cosine:
            for pg in opt.param_groups: pg["lr"] = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        step += 1
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    r = evaluate("held")
    curve.append({"epoch": ep + 1, **{d: round(r[d], 4) for d in ("d1", "d2", "d3")}})
    print(a.name, curve[-1], f"{time.time()-t0:.0f}s", flush=True)
out = {"name": a.name, "args": vars(a), "train_tokens": sum(x.shape[0] for x in train), "curve": curve,
       "held": evaluate("held"), "kjv": evaluate("kjv"), "seconds": time.time() - t0}
print(a.name, "held", {d: round(out["held"][d], 4) for d in ("d1", "d2", "d3")},
      "kjv", {d: round(out["kjv"][d], 4) for d in ("d1", "d2", "d3")}, flush=True)
os.makedirs("scratch/runs", exist_ok=True)
json.dump(out, open(f"scratch/runs/{a.name}.json", "w"), indent=1)
if a.save:
    torch.save(acc.state_dict(), a.save)
