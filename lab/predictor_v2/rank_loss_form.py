#!/usr/bin/env python
# Usage: python lab/predictor_v2/rank_loss_form.py orig|lse|lme|hardest|none MODEL TEXT OUT.safetensors
# (orig = the form now in moe_offload.predict.train: the strongest outsider; lse = the old one)
"""Compare top-k ranking loss variants by monkeypatching train.topk_ranking_loss."""
import sys, json, math, torch, torch.nn.functional as F
import moe_offload.predict.train as T
from moe_offload import runtime
from moe_offload.cli import main
variant, model, text, out = sys.argv[1:5]
orig = T.topk_ranking_loss
def lse(logits, probs, k):
    top = probs.topk(k, dim=-1).indices
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    rest = torch.logsumexp(logits.masked_fill(inside, float("-inf")), dim=-1, keepdim=True)
    return F.softplus(rest - logits.gather(1, top)).mean()
def lme(logits, probs, k):
    top = probs.topk(k, dim=-1).indices
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    rest = torch.logsumexp(logits.masked_fill(inside, float("-inf")), dim=-1, keepdim=True) - math.log(logits.shape[-1] - k)
    return F.softplus(rest - logits.gather(1, top)).mean()
def hardest(logits, probs, k):
    # each true top-k logit above the largest outsider (margin 0, softplus)
    top = probs.topk(k, dim=-1).indices
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    rest = logits.masked_fill(inside, float("-inf")).max(dim=-1, keepdim=True).values
    return F.softplus(rest - logits.gather(1, top)).mean()
T.topk_ranking_loss = {"orig": orig, "lse": lse, "lme": lme, "hardest": hardest, "none": lambda l, p, k: l.sum() * 0}[variant]
torch.set_num_threads(1)
sys.exit(main(["train-accelerator", "--model", model, "--text", text, "--out", out, "--max-tokens", "100000", "--epochs", "3"]))
