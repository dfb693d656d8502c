"""Offloading is exact, survives races and failed copies, keeps honest stats, and rejects bad budgets."""

import random

import numpy as np
import pytest
import torch

import moe_offload
from helpers import CFG, write_model
from moe_offload import MoeOffloadError
from moe_offload.offload import (CopyFailed, CopyFaults, ExpertCache, HostExpertStore, ThreadCopyEngine,
                                 make_policy)
from moe_offload.offload import store as store_mod
from moe_offload.options import OffloadConfig

L, E, K = CFG.num_hidden_layers, CFG.num_local_experts, CFG.num_experts_per_tok
PROMPT = [1, 7, 3, 9, 11, 4, 2, 8, 5, 13, 6, 21]  # 12 tokens: prefill needs every expert of a layer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def reference(model_path):
    m = moe_offload.load(model_path, device="cpu", offload=False)
    assert m.expert_cache is None
    return m.logits(PROMPT), m.generate(PROMPT, max_new_tokens=10).token_ids, decode_logits(m, PROMPT)


def decode_logits(m, ids):
    """Prefill all but the last 4 tokens, then decode them one by one: logits [T, V]."""
    cache, net, n = m.kv_cache, m.model, len(ids) - 4
    with torch.inference_mode():
        parts = [net(torch.tensor([ids[:n]]), 0, cache)[0]]
        parts += [net(torch.tensor([[t]]), n + i, cache)[0] for i, t in enumerate(ids[n:])]
    return torch.cat(parts)


@pytest.mark.parametrize("policy", ["lru", "lru-layer", "lfu", "predictive"])
def test_offloaded_equals_resident_at_every_capacity(model_path, reference, policy):
    ref_logits, ref_tokens, ref_decode = reference
    lowest = K * L if policy == "lru-layer" else K
    for cap in range(lowest, L * E + 1):
        m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=cap, policy=policy))
        assert m.expert_cache.num_slots == cap
        assert torch.equal(m.logits(PROMPT), ref_logits), (policy, cap)  # prefill, grouped when cap < E
        st = m.cache_stats()
        assert st["hits"] + st["misses"] == st["uses"] == L * E  # 12 tokens hit all 4 experts per layer
        assert st["bytes_h2d"] == st["misses"] * m.expert_cache.store.expert_bytes
        assert torch.equal(decode_logits(m, PROMPT), ref_decode), (policy, cap)
        res = m.generate(PROMPT, max_new_tokens=10)
        assert res.token_ids == ref_tokens, (policy, cap)
        assert res.stats["hits"] + res.stats["misses"] == res.stats["uses"]
        assert all(p["hits"] + p["misses"] == p["uses"] for p in res.stats["per_layer"])


def test_all_experts_resident_means_no_misses_after_warmup(model_path):
    m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=L * E))
    m.logits(PROMPT)
    assert m.cache_stats()["misses"] == L * E  # the first pass loads every expert once
    m.logits(PROMPT)
    st = m.cache_stats()
    assert st["misses"] == 0 and st["hits"] == st["uses"] and st["bytes_h2d"] == 0


def test_random_copy_delays_keep_results_exact(model_path, reference):
    ref_logits, ref_tokens, _ = reference
    m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=3))
    rng = random.Random(0)
    m.expert_cache.engine.faults = CopyFaults(delay=lambda key: rng.uniform(0, 0.004))
    assert torch.equal(m.logits(PROMPT), ref_logits)
    assert m.generate(PROMPT, max_new_tokens=10).token_ids == ref_tokens
    assert m.cache_stats()["stall_seconds"] > 0


def test_failed_copy_raises_and_cache_stays_consistent(model_path, reference):
    ref_logits, ref_tokens, _ = reference
    m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=3))
    m.expert_cache.engine.faults = CopyFaults(fail=lambda key: key == (1, 2))
    with pytest.raises(CopyFailed, match="copy of expert 2 of layer 1 into slot"):
        m.logits(PROMPT)
    c = m.expert_cache
    assert not c.pinned and not c.inflight and not c.is_resident(1, 2)
    assert sorted(c.free_slots + [int(c.slot_of[k]) for k in c.resident()]) == list(range(3))
    c.stats.check()
    m.expert_cache.engine.faults = CopyFaults()
    assert torch.equal(m.logits(PROMPT), ref_logits)  # a later call works, and exactly
    assert m.generate(PROMPT, max_new_tokens=10).token_ids == ref_tokens


def tiny_cache(num_slots, policy, layers=2, experts=4):
    store = HostExpertStore(layers, experts, 16, 16, torch.float32)
    for l in range(layers):
        for e in range(experts):
            store.row(l, e).fill_(l * 10 + e)
    return ExpertCache(store, num_slots, make_policy(policy), torch.device("cpu"), ThreadCopyEngine())


def access(cache, layer, experts):
    cache.acquire(layer, experts)
    cache.release(layer, experts)


def test_lru_evicts_least_recent_and_slots_hold_the_right_expert():
    c = tiny_cache(3, "lru")
    for layer, e in [(0, 0), (0, 1), (1, 0), (0, 0), (1, 3)]:  # (0,1) is least recent when (1,3) comes
        access(c, layer, [e])
    assert set(c.resident()) == {(0, 0), (1, 0), (1, 3)}
    for key in c.resident():
        assert torch.all(c.pool[c.slot_of[key]] == key[0] * 10 + key[1])
        assert c.slot_table[key].item() == c.slot_of[key]  # device table mirrors the host one
    assert c.stats.misses.tolist() == [2, 2] and c.stats.hits.tolist() == [1, 0]


def test_lfu_evicts_least_frequent():
    c = tiny_cache(3, "lfu")
    for layer, e in [(0, 0), (0, 0), (0, 0), (0, 1), (0, 2), (0, 1), (0, 3)]:
        access(c, layer, [e])  # counts: 0->3, 1->2, 2->1: (0,2) goes
    assert set(c.resident()) == {(0, 0), (0, 1), (0, 3)}
    # (The tie-break by recency is tested in test_one_house.py, with a real tie.)


def test_lru_layer_keeps_each_layer_within_its_share():
    c = tiny_cache(4, "lru-layer")
    for e in [0, 1, 2, 3]:
        access(c, 0, [e])
    access(c, 1, [0])
    assert c.resident_per_layer.tolist() == [2, 1]
    assert set(k for k in c.resident() if k[0] == 0) == {(0, 2), (0, 3)}


def test_predictive_policy_evicts_farthest_predicted_use_and_is_lru_without_predictions():
    c = tiny_cache(2, "predictive")
    access(c, 0, [0])
    access(c, 0, [1])
    access(c, 0, [2])  # no predictions: LRU, (0,0) goes
    assert set(c.resident()) == {(0, 1), (0, 2)}
    c.policy.set_next_use({(0, 1): 5.0, (0, 2): 1.0})
    access(c, 0, [3])  # (0,1) is needed later than (0,2)
    assert set(c.resident()) == {(0, 2), (0, 3)}


def test_pinned_and_inflight_experts_are_never_evicted():
    c = tiny_cache(2, "lru")
    c.acquire(0, [0, 1])  # both pinned (in use by the current layer)
    with pytest.raises(MoeOffloadError, match="no evictable slot"):
        c.acquire(0, [2])
    c.release(0, [0, 1])
    assert set(c.resident()) == {(0, 0), (0, 1)} and not c.pinned


def test_budget_errors_and_clamping(model_path, monkeypatch):
    for kw, needle in (({"cache_experts": 0}, "tuning.cache_experts must be >= 1, got 0"),
                       ({"cache_experts": 1}, r"tuning.cache_experts must be in \[2, 8\] for this model"),
                       ({"cache_experts": 100}, r"tuning.cache_experts must be in \[2, 8\] for this model"),
                       ({"cache_per_layer": 1}, r"cache_per_layer must be in \[2, 4\] for this model"),
                       ({"cache_per_layer": 9}, r"cache_per_layer must be in \[2, 4\] for this model")):
        with pytest.raises(MoeOffloadError, match=needle):
            moe_offload.load(model_path, config=OffloadConfig.make(device="cpu", **kw))
    with pytest.raises(MoeOffloadError, match="below the minimum 4 \\(top_k=2 per layer x 2 layers"):
        moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=3, policy="lru-layer"))
    m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=L * E))
    assert m.expert_cache.num_slots == L * E
    with pytest.raises(MoeOffloadError, match="cache_gb 100000 .* exceeds what is free on cpu"):
        moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_gb=100000))
    with pytest.raises(MoeOffloadError, match="at most one cache budget"):
        moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_gb=1, cache_experts=3))
    with pytest.raises(MoeOffloadError, match="tuning.policy must be one of"):
        moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(policy="fifo"))
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + 1000)
    with pytest.raises(MoeOffloadError, match="host RAM too small for the host expert store: needs 36,864 bytes"):
        HostExpertStore(L, E, 16, 24, torch.float32)


def test_stats_reach_generate_json_with_contract_keys(model_path):
    m = moe_offload.load(model_path, device="cpu", config=OffloadConfig.make(cache_experts=3))
    st = m.generate(PROMPT, max_new_tokens=4).to_json()["stats"]
    keys = {"uses", "hits", "misses", "prefetch_hits", "prefetch_wasted", "bytes_h2d", "stall_seconds"}
    assert keys <= set(st) and all(keys <= set(p) for p in st["per_layer"]) and len(st["per_layer"]) == L
    assert st["uses"] == sum(p["uses"] for p in st["per_layer"])
    assert np.isclose(st["stall_seconds"], sum(p["stall_seconds"] for p in st["per_layer"]))


def test_demand_load_takes_the_slot_of_an_inflight_prefetch():
    c = tiny_cache(2, "lru")
    c.engine.faults = CopyFaults(delay=lambda key: 0.05 if key == (1, 3) else 0.0)
    assert c.prefetch((1, 3), protect=set())  # slow copy on the link
    access(c, 0, [0])
    assert c.fit_groups(0, [1, 2]) == [[1, 2]]  # in-flight prefetches do not shrink the groups
    access(c, 0, [1, 2])  # needs both slots: waits for the prefetch to land, then evicts it
    assert set(c.resident()) == {(0, 1), (0, 2)} and not c.inflight
    assert c.stats.prefetch_wasted.tolist() == [0, 1] and c.stats.stall_seconds.sum() > 0.01
