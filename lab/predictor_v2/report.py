import json, glob, os
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob("scratch/runs/*.json")) if "smoke" not in p}
ceil = json.load(open("scratch/ceiling.json"))
desc = {
 "context": "+ context (P, Q): the previous position's residual and a decayed mean (0.8) of all earlier ones: the new default",
 "context_prev": "+ context, previous position's residual only (P)",
 "context_prev_hint_gain": "+ context (P only) + (i) + (ii)",
 "ema": "probe (exp2, concatenated input): previous residual + decayed mean, same information as 'context'",
 "align0": "loss: alignment weight 0 (KL + ranking only)",
 "cosine": "cosine lr decay to 0.1x",
 "base": "v1 adapter as shipped (rank 128, 3 epochs, 360k train tokens, rank-loss 1) = the shipped recipe",
 "gain": "+ (ii) learned per-(l,d) norm gain G",
 "hint": "+ (i) router hint: layer l's router distribution through C [R, E]",
 "hint_gain": "+ (i) + (ii)",
 "extra5": "(v) all 954k training tokens of the train text (360k + 594k beyond the shipped 400k), 5 epochs",
 "deep": "(iv) probe: a second hidden layer (h + silu(M h)), rank 128",
 "prev": "probe (exp2, concatenated input): adapter also sees the previous position residual (same information as context_prev)",
 "post": "probe: adapter input is x_l + moe_l(x_l) (a predictor placed after layer l's experts)",
}
out = {"setup": "bundled tiny-mixtral; train = first 360k tokens of the KJV train text (examples/train_tiny_moe.py "
       "--dump-train-text), held = its next 40k tokens (the held-out split of the shipped adapter's report); kjv = "
       "moe_offload/assets/heldout_kjv.txt (48.7k tokens). Recall = fraction of layer l+d's true top-2 found in the "
       "predicted top-2, averaged over l. Seeds 0, same window order for every run.",
       "ceiling_no_training": ceil, "runs": {n: {"what": desc.get(n, n), **r} for n, r in runs.items()}}
json.dump(out, open("lab/results/predictor_v2_ablation.json", "w"), indent=1)
lines = ["# predictor v2 ablation (issue 12 part 1); held = 40k-token held-out split of the train text, kjv = assets/heldout_kjv.txt",
         "", "## no training: layer l+d's router on ...", "| input | held d1 | d2 | d3 | kjv d1 | d2 | d3 |", "|---|---|---|---|---|---|---|"]
for src in ceil["held"]:
    lines.append(f"| {src} | " + " | ".join(f"{ceil[s][src][d]:.4f}" for s in ("held", "kjv") for d in ("d1", "d2", "d3")) + " |")
lines += ["", "## trained (top-2 recall)", "| run | what | held d1 | d2 | d3 | kjv d1 | d2 | d3 | s |", "|---|---|---|---|---|---|---|---|---|"]
for n, r in out["runs"].items():
    lines.append(f"| {n} | {r['what']} | " + " | ".join(f"{r[s][d]:.4f}" for s in ("held", "kjv") for d in ("d1", "d2", "d3")) + f" | {r['seconds']:.0f} |")
pairs = [k for k in out["runs"]["base"]["held"] if k.startswith("l")]
lines += ["", "## per (l, d), held split", "| run | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
lines.append("| next-gate | " + " | ".join(f"{ceil['held']['next-gate (mid_l)'][p]:.3f}" for p in pairs) + " |")
POST = "after layer l's MoE (post_l)"
lines.append("| next-gate on post_l | " + " | ".join(f"{ceil['held'][POST][p]:.3f}" for p in pairs) + " |")
for n, r in out["runs"].items():
    lines.append(f"| {n} | " + " | ".join(f"{r['held'][p]:.3f}" for p in pairs) + " |")
open("lab/results/predictor_v2_ablation.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
