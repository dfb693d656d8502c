"""Recorded routing equals decode routing; replaying it through a cache gives the runtime's own stats."""

import numpy as np
import torch

import moe_offload
from moe_offload.model import Observer, observing
from helpers import CFG, write_model
from moe_offload.offload import ExpertCache, ThreadCopyEngine, make_policy
from moe_offload.analysis.trace import record_routing, replay
from moe_offload.options import OffloadConfig

TOKENS = [1, 5, 9, 3, 7, 11, 2, 30, 4, 8, 6, 12, 13, 40, 22, 17, 19, 1, 3, 5]


def decode_routing(m, ids, window):
    """Token-by-token decode under teacher forcing, recording routing through the hook."""
    seen = []

    class Seen(Observer):
        def on_routing(self, layer, i, w, lg, start_pos):
            seen.append(i.cpu().numpy()[0])

    with torch.inference_mode(), observing(m.model, Seen()):
        for w0 in range(0, len(ids), window):
            for p, t in enumerate(ids[w0:w0 + window]):
                m.model(torch.tensor([[t]]), p, m.kv_cache)
    return np.array(seen).reshape(len(ids), CFG.num_hidden_layers, CFG.num_experts_per_tok)


def test_chunked_prefill_routing_equals_token_by_token_decode(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu", offload=False)
    trace = record_routing(m.model, TOKENS, window=8, chunk=3)
    assert np.array_equal(trace.routed_ids, decode_routing(m, TOKENS, window=8))


def test_replay_stats_equal_runtime_stats(tmp_path):
    path = write_model(tmp_path)
    for policy, slots in (("lru", 3), ("lfu", 5), ("lru-layer", 4)):
        m = moe_offload.load(path, device="cpu", predictor="none", config=OffloadConfig.make(cache_experts=slots, policy=policy))
        m.expert_cache.stats.reset()
        routing = decode_routing(m, TOKENS, window=32)
        runtime = m.expert_cache.stats.to_dict()
        ref = moe_offload.load(path, device="cpu", offload=False)
        trace = record_routing(ref.model, TOKENS, window=32)
        cache = ExpertCache(m.expert_cache.store, slots, make_policy(policy), torch.device("cpu"), ThreadCopyEngine())
        replay(cache, trace.routed_ids)
        replayed = cache.stats.to_dict()
        for key in ("uses", "hits", "misses", "bytes_h2d"):
            assert replayed[key] == runtime[key], (policy, key)
            assert [p[key] for p in replayed["per_layer"]] == [p[key] for p in runtime["per_layer"]]
        assert np.array_equal(routing, trace.routed_ids)
