#!/usr/bin/env python
"""Train the bundled tiny Mixtral (8 experts, top-2, 6 layers) on the King James Bible.

Corpus: the King James Version text from Debian's `bible-kjv-text` package (the 1611 translation is
public domain; the package's copyright file says so). Install it with
`apt-get install bible-kjv` and this script dumps the text with the `bible` command, or pass any
UTF-8 text file with --corpus.

What it does, reproducibly (fixed --seed):
  1. splits the corpus into chapters; every 20th chapter (offset 7) is held out;
  2. trains a byte-level BPE tokenizer (tokenizers) on the training chapters only;
  3. trains a Mixtral-architecture model built from moe_offload's own model code, with the
     Switch/Mixtral load-balancing auxiliary loss, AdamW and a cosine schedule;
  4. evaluates held-out loss every --eval-every steps and keeps the best weights;
  5. writes config.json, model.safetensors (bfloat16), tokenizer.json and training_report.json in the
     Hugging Face Mixtral layout, plus the held-out text for benchmarks.

Usage: python examples/train_tiny_moe.py [--steps N] [--out DIR]   (about 40 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_offload import families
from moe_offload.checkpoint import save_checkpoint
from moe_offload.config import ModelConfig
from moe_offload.model.transformer import MoeModel, empty_resident_experts, init_random_

ASSETS = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral


def read_chapters(corpus: str | None) -> list[str]:
    """Chapters of the corpus as plain text, one verse per line, no verse numbers."""
    if corpus:
        text = Path(corpus).read_text(encoding="utf-8")
        return [c.strip() for c in re.split(r"\n\s*\n", text) if c.strip()]
    try:
        raw = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                             text=True).stdout
    except FileNotFoundError:
        sys.exit("train_tiny_moe: the `bible` command is missing; `apt-get install bible-kjv` or pass --corpus")
    chapters: list[list[str]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            chapters[-1].append(m.group(1).strip())
        else:  # a chapter heading such as "Genesis 1"
            chapters.append([line.strip()])
    return ["\n".join(c) for c in chapters]


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_stream(tok: Tokenizer, chapters: list[str], bos: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(chapters):
        ids.append(bos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: E * sum_e (fraction routed to e) * (mean router prob of e)."""
    total = 0.0
    for logits in router_logits:  # [N, E] per layer
        probs = torch.softmax(logits.float(), dim=-1)
        ids = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(ids, probs.shape[-1]).float().sum(1).mean(0) / top_k  # [E]
        total = total + probs.shape[-1] * (frac * probs.mean(0)).sum()
    return total / len(router_logits)


@torch.no_grad()
def evaluate(model: MoeModel, ids: torch.Tensor, seq: int, batch: int) -> dict:
    """Held-out loss over non-overlapping windows, plus routing statistics over the same tokens."""
    n = (ids.numel() - 1) // seq
    losses, counts, reuse, tokens = [], None, None, 0
    model.eval()
    for i in range(0, n, batch):
        starts = torch.arange(i, min(n, i + batch)) * seq
        x = torch.stack([ids[s:s + seq] for s in starts])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
        rl: list[torch.Tensor] = []
        logits = model(x, router_logits=rl)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        tokens += y.numel()
        k = model.cfg.num_experts_per_tok
        sel = torch.stack([l.topk(k, -1).indices.view(x.shape[0], seq, k) for l in rl])  # [L, B, T, k]
        c = F.one_hot(sel, model.cfg.num_local_experts).sum((1, 2, 3))  # [L, E]
        counts = c if counts is None else counts + c
        hit = (sel[:, :, 1:, :, None] == sel[:, :, :-1, None, :]).any(-1).float().sum((1, 2, 3))  # [L]
        reuse = hit if reuse is None else reuse + hit
    model.train()
    p = counts.float() / counts.sum(1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log2()).sum(1)  # bits; log2(E) is perfectly balanced
    pairs = n * (seq - 1) * model.cfg.num_experts_per_tok
    return {"heldout_loss": (torch.stack(losses).sum() / tokens).item(), "heldout_tokens": tokens,
            "usage_entropy_bits": [round(v, 4) for v in entropy.tolist()],
            "usage_fraction": [[round(v, 4) for v in row] for row in p.tolist()],
            "prev_token_reuse": [round(v, 4) for v in (reuse / pairs).tolist()]}


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="UTF-8 text file (chapters separated by blank lines); default: KJV via `bible`")
    ap.add_argument("--out", default=str(ASSETS / "tiny-mixtral"), help="model folder to write")
    ap.add_argument("--heldout-out", default=str(ASSETS / "heldout_kjv.txt"), help="held-out text to write")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.02, help="load-balancing loss weight (Mixtral: 0.02)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--family", choices=["mixtral", "qwen3_moe"], default="mixtral",
                    help="architecture written: mixtral (default, the bundled model) or qwen3_moe (per-head q/k "
                         "RMSNorm, hub Qwen3-MoE names), e.g. for routing traces of a many-expert model")
    ap.add_argument("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dump-train-text", metavar="FILE", default=None,
                    help="only write the training split's text to FILE (for train-accelerator) and exit")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    chapters = read_chapters(args.corpus)
    held = [c for i, c in enumerate(chapters) if i % 20 == 7]
    train = [c for i, c in enumerate(chapters) if i % 20 != 7]
    if args.dump_train_text:
        Path(args.dump_train_text).write_text("\n\n".join(train) + "\n", encoding="utf-8")
        return
    tok = train_tokenizer(train, args.vocab)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    train_ids, held_ids = encode_stream(tok, train, bos), encode_stream(tok, held, bos)
    print(f"corpus: {len(chapters)} chapters; train {train_ids.numel()} tokens, held-out {held_ids.numel()} "
          f"tokens ({sum(map(len, held))} chars)", flush=True)

    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=args.experts,
                      num_experts_per_tok=args.top_k, head_dim=args.hidden // 4, rope_theta=10000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=args.seq_len, sliding_window=None,
                      tie_word_embeddings=False, bos_token_id=bos, eos_token_ids=(eos,),
                      torch_dtype="bfloat16", model_type=args.family, qk_norm=families.get(args.family).qk_norm)
    cpu = torch.device("cpu")
    model = MoeModel(cfg, empty_resident_experts(cfg, torch.float32, cpu), dtype=torch.float32,
                               device=cpu, max_seq_len=args.seq_len)
    init_random_(model, args.seed)
    params = [p.requires_grad_(True) for p in model.parameters()]
    decay = [p for p in params if p.dim() > 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    curve, best, best_state = [], float("inf"), None
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, held_ids, args.seq_len, 16)
            curve.append({"step": step, "heldout_loss": round(ev["heldout_loss"], 4),
                          "seconds": round(time.time() - t0, 1)})
            print(f"step {step:5d}  held-out loss {ev['heldout_loss']:.4f}  reuse "
                  f"{sum(ev['prev_token_reuse']) / cfg.num_hidden_layers:.3f}  entropy "
                  f"{min(ev['usage_entropy_bits']):.3f}  {time.time() - t0:.0f}s", flush=True)
            if ev["heldout_loss"] < best:
                best, best_eval = ev["heldout_loss"], ev
                best_state = {k: v.detach().clone() for k, v in model.checkpoint_tensors().items()}
        if step == args.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])
        y = torch.stack([train_ids[s + 1:s + args.seq_len + 1] for s in starts])
        rl: list[torch.Tensor] = []
        logits = model(x, router_logits=rl)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = load_balancing_loss(rl, cfg.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (lm + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"  step {step:5d}  train loss {lm.item():.4f}  aux {aux.item():.4f}  lr {lr_at(step, args):.2e}",
                  flush=True)

    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")  # write everything, then rename: never half-written
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, cfg, {k: v.to(torch.bfloat16) for k, v in best_state.items()})
    tok.save(str(tmp / "tokenizer.json"))
    report = {"corpus": args.corpus or "King James Version (Debian bible-kjv-text 4.38; public domain)",
              "split": "chapters with index % 20 == 7 held out", "args": vars(args),
              "train_tokens": train_ids.numel(), "params": cfg.total_params,
              "best_heldout_loss": round(best, 4), "curve": curve,
              "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
              **{k: v for k, v in best_eval.items() if k != "heldout_loss"}}
    (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    Path(args.heldout_out).write_text("\n\n".join(held) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("best_heldout_loss", "usage_entropy_bits", "prev_token_reuse",
                                              "train_seconds")}, indent=1))


if __name__ == "__main__":
    main()
