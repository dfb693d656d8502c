import os, json
import torch
torch.set_num_threads(1)
import moe_offload
from moe_offload.model.layers import rms_norm
import torch.nn.functional as F

model = moe_offload.load(None, device="cpu", offload=False); m = model.model
L, k, eps = m.cfg.num_hidden_layers, m.cfg.num_experts_per_tok, m.cfg.rms_norm_eps
def logits(t, h): return F.linear(rms_norm(h, m.layers[t].post_attention_layernorm, eps), m.layers[t].gate)
out = {}
for split in ("held", "kjv"):
    c = torch.load(f"scratch/{split}.pt")
    mid, post = torch.cat(c["mid"]), torch.cat(c["post"])  # [T, L, H]
    true = torch.stack([logits(t, mid[:, t]).topk(k, -1).indices for t in range(L)], 1)  # [T, L, k]
    res = {}
    for src, X in (("next-gate (mid_l)", mid), ("after layer l's MoE (post_l)", post)):
        per = {}
        for d in (1, 2, 3):
            hits = n = 0
            for l in range(L - d):
                top = logits(l + d, X[:, l]).topk(k, -1).indices
                h = (true[:, l + d, :, None] == top[:, None, :]).any(-1).sum().item()
                per[f"l{l}_d{d}"] = h / (top.numel()); hits += h; n += top.numel()
            per[f"d{d}"] = hits / n
        res[src] = per
    out[split] = res
    for src, per in res.items():
        print(split, src, {d: round(per[d], 4) for d in ("d1", "d2", "d3")})
json.dump(out, open("scratch/ceiling.json", "w"), indent=1)
