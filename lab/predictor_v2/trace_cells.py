import sys, json, numpy as np
from moe_offload.analysis.trace import load_trace
out = {}
for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
    tr = load_trace(path); p = tr.preds["m2r2"]; ids = tr.routed_ids.astype(int); T, L, k = ids.shape
    cells = {}
    for l in range(L - 1):
        for d in range(1, 4):
            if l + d >= L: break
            top = np.argsort(-np.nan_to_num(p[:, l, d - 1], nan=-1), axis=-1, kind="stable")[:, :k]
            cells[f"l{l}_d{d}"] = float((ids[:, l + d, :, None] == top[:, None, :]).any(-1).mean())
    out[name] = cells
    print(name, " ".join(f"{c}:{v:.3f}" for c, v in cells.items()))
json.dump(out, open("scratch/cells_trace.json", "w"), indent=1)
