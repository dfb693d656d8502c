"""Per-(l, d) top-2 recall of adapter files on cached residuals (kjv = assets/heldout_kjv.txt)."""
import sys, json
import torch
torch.set_num_threads(1)
import moe_offload
from moe_offload.predict import Accelerator, M2R2Predictor
from moe_offload.predict.train import true_router_probs
model = moe_offload.load(None, device="cpu", offload=False); m = model.model
L, k = m.cfg.num_hidden_layers, m.cfg.num_experts_per_tok
out = {}
for f in sys.argv[2:]:
    acc, meta = Accelerator.load(f, m)
    res = {}
    with torch.no_grad():
        c = torch.load(f"scratch/{sys.argv[1]}.pt")["mid"]
        hits, tot = {}, {}
        for mid in c:  # each window from position 0, as the model saw it
            true = true_router_probs(m, mid).topk(k, -1).indices
            pred = M2R2Predictor(m, acc, 3)
            for l in range(L - 1):
                s = pred.scores(l, mid[:, l], 0)
                for d in (1, 2, 3):
                    if l + d >= L: continue
                    top = s[:, d - 1].topk(k, -1).indices
                    key = f"l{l}_d{d}"
                    hits[key] = hits.get(key, 0) + (true[:, l + d, :, None] == top[:, None, :]).any(-1).sum().item()
                    tot[key] = tot.get(key, 0) + top.numel()
        for key in hits: res[key] = hits[key] / tot[key]
        for d in (1, 2, 3):
            ks = [x for x in hits if x.endswith(f"d{d}")]
            res[f"d{d}"] = sum(hits[x] for x in ks) / sum(tot[x] for x in ks)
    out[f] = res
    print(f, {d: round(res[d], 4) for d in ("d1", "d2", "d3")})
json.dump(out, open(f"scratch/evalfile_{sys.argv[1]}.json", "w"), indent=1)
