"""Probe: does running layer l+1's real attention (real K/V history, own K/V from an approximate residual)
on layer l's residual raise the router recall of layers l+1.. ? No training."""
import os, sys, time, math
os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch, torch.nn.functional as F
import moe_offload
from moe_offload.predict.train import windows
from moe_offload.model.layers import rms_norm, apply_rope

model = moe_offload.load(None, device="cpu", offload=False); m = model.model
cfg = m.cfg; L, k, eps = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.rms_norm_eps
nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
ids = model.encode_text(open(moe_offload.__path__[0] + "/assets/heldout_kjv.txt").read())
NW = int(sys.argv[1]) if len(sys.argv) > 1 else 40

def qkv(layer, x):  # x [T,H] raw residual -> q [nh,T,hd], k,v [nkv,T,hd] (roped)
    w = m.layers[layer]; T = x.shape[0]
    z = m._qkv(rms_norm(x, w.input_layernorm, eps)[None], w)[0]  # [T, nh+2nkv, hd]
    cos, sin = m.rope_cos[:T, None], m.rope_sin[:T, None]
    qk = apply_rope(z[:, :nh + nkv], cos, sin).transpose(0, 1)
    return qk[:nh], qk[nh:], z[:, nh + nkv:].transpose(0, 1)

def peek(layer, s, K, V):
    """attention of `layer` for queries from s [T,H], keys/values: real K,V [nkv,T,hd] for j<i, own for j=i"""
    q, kh, vh = qkv(layer, s)
    rep = nh // nkv
    Kr, Vr, khr, vhr = (t.repeat_interleave(rep, 0) for t in (K, V, kh, vh))
    T = s.shape[0]
    S = q @ Kr.transpose(1, 2) / math.sqrt(hd)  # [nh,T,T]
    diag = (q * khr).sum(-1) / math.sqrt(hd)
    idx = torch.arange(T)
    S[:, idx, idx] = diag
    S = S.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    P = S.softmax(-1)
    o = P @ Vr + P[:, idx, idx][..., None] * (vhr - Vr)  # [nh,T,hd]
    return F.linear(o.transpose(0, 1).reshape(T, -1), m.layers[layer].o_proj)

def top(t, h):
    return F.linear(rms_norm(h, m.layers[t].post_attention_layernorm, eps), m.layers[t].gate).topk(k, -1).indices

stats = {}
def add(name, true, pred):
    h = (true[:, :, None] == pred[:, None, :]).any(-1).sum().item()
    a = stats.setdefault(name, [0, 0]); a[0] += h; a[1] += pred.numel()

t0 = time.time()
with torch.inference_mode():
    for w in windows(ids, 256)[:NW]:
        x = F.embedding(torch.tensor(w), m.embed_tokens)
        mids, posts, KV = [], [], []
        for i in range(L):
            _, K, V = qkv(i, x); KV.append((K, V))
            x = x + m._attention(rms_norm(x, m.layers[i].input_layernorm, eps)[None], i, 0, None)[0]
            mids.append(x)
            x = x + m._moe(rms_norm(x, m.layers[i].post_attention_layernorm, eps)[None], i, 0)[0][0]
            posts.append(x)
        true = [top(i, mids[i]) for i in range(L)]
        for l in range(L - 1):
            # sanity: exact
            s = posts[l] + peek(l + 1, posts[l], *KV[l + 1]); add(f"sanity l{l}", true[l + 1], top(l + 1, s))
            for src, s in (("mid", mids[l]), ("post", posts[l])):
                for d in range(1, 4):
                    if l + d >= L: break
                    add(f"nextgate-{src} d{d}", true[l + d], top(l + d, s))
                    add(f"nextgate-{src} l{l}d{d}", true[l + d], top(l + d, s))
                s_chain = s
                for d in range(1, 4):
                    if l + d >= L: break
                    s_chain = s_chain + peek(l + d, s_chain, *KV[l + d])
                    add(f"peek-{src} d{d}", true[l + d], top(l + d, s_chain))
                    add(f"peek-{src} l{l}d{d}", true[l + d], top(l + d, s_chain))
print(f"{time.time()-t0:.0f}s")
for n, (h, c) in sorted(stats.items()):
    print(f"{n:28s} {h/c:.4f}")
