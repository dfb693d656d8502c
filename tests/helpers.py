"""Tiny random Mixtral checkpoints written by transformers itself (the parity oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moe_offload import ModelConfig
from moe_offload.checkpoint import expected_tensors, save_checkpoint
from moe_offload.options import OffloadConfig

# Shapes chosen to cover: odd sizes, 1 and 2 layers, GQA and MHA, top-1 and top-2, tied and untied
# embeddings, a sliding window shorter than the test sequences, and a sharded checkpoint.
SHAPES = {
    "odd_gqa": dict(hidden_size=36, intermediate_size=22, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, vocab_size=97),
    "one_layer_top1_tied": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                num_experts_per_tok=1, vocab_size=64, tie_word_embeddings=True),
    "window_top2": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=80,
                        sliding_window=7),
    "sharded": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=70,
                    max_shard_size="40KB"),
}


def make_hf_checkpoint(path: Path, max_shard_size: str | None = None, **kw):
    """Build a random MixtralForCausalLM, save it with save_pretrained, return the (eval) model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    # The eager (per-expert loop) experts path is the oracle; the grouped_mm path needs 16-byte strides.
    cfg = dict(experts_implementation="eager", max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, sliding_window=None)
    cfg.update(kw)
    model = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    # Norm weights are ones at init; perturb them so a wrong norm shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def edit_config(path: Path, **changes) -> None:
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


# A small model written by this project's own saver (fast; no transformers needed).
CFG = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                    num_experts_per_tok=2, head_dim=8, max_position_embeddings=32, torch_dtype="float32")


def write_model(path: Path, cfg: ModelConfig = CFG, seed: int = 0, **kw) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 0.1 for n, s in expected_tensors(cfg).items()}
    save_checkpoint(path, cfg, tensors, **kw)
    return path


def decode_with_failing_prefetches(model_path, make_engine) -> list:
    """Greedy decoding and prefill logits of the model at `model_path` with an expert cache (3 and 5
    slots, next-gate prefetch, wide windows) whose copy engine is make_engine(fail, rng), copies in
    chunks of 128 bytes; `fail` fails about a third of the prefetches, never a demand load. Asserts
    outputs equal to the resident model's and consistent stats; returns the caches for further checks."""
    import random

    import moe_offload

    prompt = [1, 7, 3, 9, 11, 4]
    ref = moe_offload.load(model_path, device="cpu", offload=False)
    expected = ref.generate(prompt, max_new_tokens=12).token_ids
    caches = []
    for slots, window in ((3, 3), (5, 6)):
        m = moe_offload.load(model_path, device="cpu", predictor="next-gate",
                             config=OffloadConfig.make(cache_experts=slots, lookahead=1, prefetch_margin=1))
        m.prefetcher.max_inflight = window  # many copies in flight at once: more interleavings
        c = m.expert_cache
        rng = random.Random(slots)
        prefetching = set()  # keys inside cache.prefetch: an engine may start a prefetch before it is recorded
        plain_prefetch = c.prefetch

        def tracked_prefetch(key, *args, plain_prefetch=plain_prefetch, prefetching=prefetching, **kw):
            prefetching.add(key)
            try:
                return plain_prefetch(key, *args, **kw)
            finally:
                prefetching.discard(key)
        c.prefetch = tracked_prefetch

        def fail(key, c=c, rng=rng, prefetching=prefetching):
            h = c.inflight.get(key)
            return (key in prefetching or (h is not None and h.prefetch)) and rng.random() < 0.35

        c.engine.close()
        c.engine = make_engine(fail, rng)
        assert c.store.expert_bytes > 5 * 128  # an expert row here is ~10 chunks
        res = m.generate(prompt, max_new_tokens=12)
        assert res.token_ids == expected, slots
        assert torch.equal(m.logits(prompt), ref.logits(prompt))
        st = res.stats
        assert st["hits"] + st["misses"] == st["uses"] and st["prefetch_issued"] > 0
        c.stats.check()
        assert not c.pinned
        caches.append(c)
    return caches


class OraclePredictor:
    """A test predictor: true future routing from a trace (an upper bound): the routed weights of layers l+1..l+D for
    the token at trace index start_pos."""

    name = "oracle"
    cross_token = False

    def __init__(self, routed_ids, routed_weights, num_experts: int, lookahead: int):
        self.ids, self.weights = routed_ids, routed_weights  # [T, L, k]
        self.num_experts, self.lookahead = num_experts, lookahead

    def _row(self, t: int, layer: int) -> torch.Tensor:
        row = torch.zeros(self.num_experts)
        if t < self.ids.shape[0]:
            row[torch.as_tensor(self.ids[t, layer].astype("int64"))] = torch.as_tensor(self.weights[t, layer]) + 1.0
        return row

    def scores(self, layer: int, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        L = self.ids.shape[1]
        out = torch.full((x.shape[0], self.lookahead, self.num_experts), float("nan"))
        for d in range(1, self.lookahead + 1):
            if layer + d < L:
                for n in range(x.shape[0]):
                    out[n, d - 1] = self._row(start_pos + n, layer + d)
        return out.to(x.device)

    def observe(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        pass

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        rows = torch.stack([self._row(pos, t) for t in range(min(self.lookahead, self.ids.shape[1]))])
        return torch.topk(rows, take, dim=-1).indices.numpy()  # [D, take]



def use_oracle(model, trace, lookahead: int = 1) -> None:
    """Swap an offloaded model's prefetch predictor for the oracle of `trace` (a RoutingTrace)."""
    model.prefetcher.predictor = OraclePredictor(trace.routed_ids, trace.routed_weights,
                                                 model.config.num_local_experts, lookahead)


def as_reference(model):
    """A resident quantized model with its experts run by dequantize-then-matmul: the exact twin of
    the offloaded loop backend (the CPU ops round differently)."""
    model.model.experts = model.model.experts.reference()
    return model


def group(fmt: str, g: int) -> int | None:
    """The group_size setting for an expert format: g for int4, none for the others (they have no groups)."""
    return g if fmt == "int4" else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return ((a - b).abs().max() / b.abs().max()).item()


def decode_logits(m, ids, n_prefill: int = 3):
    """Prefill ids[:n_prefill], then decode the rest one token at a time through the KV cache: [T, V]."""
    cache, net = m.kv_cache, m.model
    with torch.inference_mode():
        parts = [net(torch.tensor([ids[:n_prefill]]), 0, cache)[0]]
        parts += [net(torch.tensor([[t]]), n_prefill + i, cache)[0] for i, t in enumerate(ids[n_prefill:])]
    return torch.cat(parts)


def rounded_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> float64 x' = q * d with q and d from gguf.quants' Q8_0 quantizer (llama.cpp's rounding);
    d taken before its fp16 cast (the kernels keep it in float32), so d = max|x| / 127 per block of 32."""
    from gguf import GGMLQuantizationType, quants

    blocks = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)  # fp16 d, then 32 int8
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float64))  # [M*K/32, 32]
    d = x.reshape(-1, 32).abs().amax(-1, keepdim=True).div(127).double()  # float32 division, as both quantizers
    return (q * d).reshape(x.shape)
