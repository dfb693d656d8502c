"""Cache residuals entering each layer's MoE (mid) and after its MoE output (post) for windows of 256."""
import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
import moe_offload
from moe_offload.predict.train import windows
from moe_offload.model.layers import rms_norm

def run(model, ids, window=256):
    m = model.model
    eps = m.cfg.rms_norm_eps
    mids, posts = [], []
    with torch.inference_mode():
        for w in windows(ids, window):
            x = torch.nn.functional.embedding(torch.tensor([w]), m.embed_tokens)
            mid, post = [], []
            for i, layer in enumerate(m.layers):
                x = x + m._attention(rms_norm(x, layer.input_layernorm, eps), i, 0, None)
                mid.append(x[0].clone())
                y, _ = m._moe(rms_norm(x, layer.post_attention_layernorm, eps), i, 0)
                x = x + y
                post.append(x[0].clone())
            mids.append(torch.stack(mid, 1)); posts.append(torch.stack(post, 1))
    return mids, posts

if __name__ == "__main__":
    model = moe_offload.load(None, device="cpu", offload=False)
    t0 = time.time()
    all_ids = model.encode_text(open("scratch/train.txt", encoding="utf-8").read())
    print("train text tokens", len(all_ids))
    held_kjv = model.encode_text(open(moe_offload.__path__[0] + "/assets/heldout_kjv.txt", encoding="utf-8").read())
    print("heldout_kjv tokens", len(held_kjv))
    ids = all_ids[:400000]
    split = int(len(ids) * 0.9)
    for name, part in (("held", ids[split:]), ("kjv", held_kjv), ("train", ids[:split]), ("extra", all_ids[400000:])):
        mids, posts = run(model, part)
        torch.save({"mid": mids, "post": posts if name in ("held", "kjv") else None}, f"scratch/{name}.pt")
        print(name, len(part), sum(x.shape[0] for x in mids), f"{time.time()-t0:.0f}s", flush=True)
