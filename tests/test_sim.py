"""The cache-hit bench and the timeline simulator: bounds, monotonicity, agreement with the runtime,
and hand-computed timelines."""

import numpy as np
import pytest
import torch

import moe_offload
from helpers import CFG, write_model
from moe_offload.analysis.bench import bench_cache, model_config, predictor_from_trace, predictor_seconds, simulate
from moe_offload.analysis.sim import RecordedPredictor, StepCosts, get_hardware, run_timeline
from moe_offload.analysis.trace import record_routing
from moe_offload.options import OffloadConfig

UNIT = StepCosts(attention=1.0, expert=1.0, bookkeeping=0.0, head=0.0, copy=0.5, expert_bytes=100)


def random_trace(T, L, E, k, seed):
    rng = np.random.default_rng(seed)
    # Skewed, sticky routing, so that policies differ.
    p = rng.dirichlet(np.ones(E) * 0.5, size=L)
    ids = np.zeros((T, L, k), dtype=np.int16)
    for t in range(T):
        for l in range(L):
            ids[t, l] = ids[t - 1, l] if t and rng.random() < 0.3 else rng.choice(E, size=k, replace=False, p=p[l])
    return ids


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    m = moe_offload.load(write_model(tmp_path_factory.mktemp("m")), device="cpu", offload=False)
    ids = torch.randint(3, CFG.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    from moe_offload.predict import NextGate

    return m, record_routing(m.model, ids, window=32, predictors={"next-gate": NextGate(m.model, 1)})


def test_belady_is_never_beaten(recorded):
    traces = [random_trace(200, 3, 8, 2, seed) for seed in range(3)] + [recorded[1].routed_ids]
    for ids in traces:
        L, E = ids.shape[1], int(ids.max()) + 1
        for slots in range(2, L * E + 1, 3):
            best = run_timeline(ids, E, slots, "belady", UNIT).stats["hits"]
            for policy in ("lru", "lfu", "predictive") + (("lru-layer",) if slots >= 2 * L else ()):
                assert run_timeline(ids, E, slots, policy, UNIT).stats["hits"] <= best, (policy, slots)


def test_lru_hit_rate_is_monotone_in_capacity_on_recorded_traces(recorded):
    # LRU is a stack algorithm: the residents with c slots are always a subset of those with c + 1.
    ids = recorded[1].routed_ids
    E = CFG.num_local_experts
    rates = [run_timeline(ids, E, s, "lru", UNIT).stats["hit_rate"] for s in range(2, ids.shape[1] * E + 1)]
    assert all(a <= b for a, b in zip(rates, rates[1:])), rates


def test_bench_numbers_equal_the_runtime_stats(recorded, tmp_path):
    m, trace = recorded
    path = write_model(tmp_path)
    rows = bench_cache(trace, [3, 5], ["lru", "lfu"], ["none"], UNIT)
    for row in (r for r in rows if r["predictor"] == "none" and r["policy"] in ("lru", "lfu")):
        rt = moe_offload.load(path, device="cpu", predictor="none", config=OffloadConfig.make(cache_experts=row["capacity"], policy=row["policy"]))
        rt.expert_cache.stats.reset()
        with torch.inference_mode():  # the same tokens, decode order, same windows as the trace
            ids = trace.token_ids.tolist()
            for w0 in range(0, len(ids), trace.window):
                for p, t in enumerate(ids[w0:w0 + trace.window]):
                    rt.model(torch.tensor([[t]]), p, rt.kv_cache)
        st = rt.expert_cache.stats.to_dict()
        assert (row["uses"], row["hits"], row["misses"]) == (st["uses"], st["hits"], st["misses"])


def one_hot_predictor(scores_by_layer, embed):
    preds = np.full((1, 2, 1, 2), np.nan, dtype=np.float32)
    preds[0, 0, 0] = scores_by_layer
    return RecordedPredictor("test", preds, np.array([[embed]], dtype=np.float32))


ROUTING = np.array([[[0], [1]]])  # one token, layer 0 -> expert 0, layer 1 -> expert 1 (k = 1)


def test_timeline_fully_overlapped_copies():
    # t=0 prefetch (0,0) lands 0.5; layer 0 attention to 1, hit on time, prefetch (1,1) lands 1.5;
    # expert to 2; layer 1 attention to 3, hit on time; expert to 4.
    r = run_timeline(ROUTING, 2, 2, "lru", UNIT, one_hot_predictor([0, 1], [1, 0]), margin=0)
    assert r.seconds == pytest.approx(4.0) and r.exposed_copy_seconds == 0
    assert r.stats["misses"] == 0 and r.stats["late_hits"] == 0 and r.stats["prefetch_hits"] == 2


def test_timeline_fully_exposed_copies():
    slow = StepCosts(attention=1.0, expert=1.0, bookkeeping=0.0, head=0.0, copy=5.0, expert_bytes=100)
    # No prediction: each layer waits for its whole copy: 1 + 5 + 1 + 1 + 5 + 1.
    r = run_timeline(ROUTING, 2, 2, "lru", slow)
    assert r.seconds == pytest.approx(14.0) and r.exposed_copy_seconds == pytest.approx(10.0)
    assert r.stats["misses"] == 2
    # Right predictions that come too late: the prefetches are hits, but late ones.
    r = run_timeline(ROUTING, 2, 2, "lru", slow, one_hot_predictor([0, 1], [1, 0]), margin=0)
    assert r.seconds == pytest.approx(11.0) and r.exposed_copy_seconds == pytest.approx(7.0)
    assert r.stats["late_hits"] == 2 and r.stats["misses"] == 0


def test_timeline_demand_miss_after_a_wrong_prediction():
    # Layer 1 is predicted to use expert 0; it uses expert 1: a demand miss at t=3, the link is free
    # (the wrong prefetch landed at 1.5), so 0.5 exposed; total 4.5.
    r = run_timeline(ROUTING, 2, 2, "lru", UNIT, one_hot_predictor([1, 0], [1, 0]), margin=0)
    assert r.seconds == pytest.approx(4.5) and r.exposed_copy_seconds == pytest.approx(0.5)
    assert r.stats["misses"] == 1 and r.stats["prefetch_wasted"] == 0  # still resident, not evicted


def test_simulate_projects_within_its_limits(recorded):
    _, trace = recorded
    cfg, hw = model_config("mixtral-8x7b"), get_hardware("rtx4090-pcie4")
    for dtype in ("bf16", "int4"):
        p = simulate(trace, cfg, hw, dtype, None, "next-gate")
        assert p.limits["link_bound_belady_tokens_per_second"] <= p.limits["all_resident_tokens_per_second"]
        assert p.tokens_per_second <= p.limits["all_resident_tokens_per_second"] * (1 + 1e-9)
        assert p.per_token["total"] == pytest.approx(p.per_token["compute"] + p.per_token["exposed_copy"]
                                                     + p.per_token["bookkeeping"])
        # with the CPU lane the device also waits for the host's experts: the parts still add up
        from moe_offload.analysis.sim import get_cpu

        lane = simulate(trace, cfg, hw, dtype, 64, "next-gate", cpu=get_cpu("desktop-ddr5-2ch"))
        t = lane.per_token
        assert t["cpu_wait"] > 0 and t["total"] == pytest.approx(t["compute"] + t["exposed_copy"] + t["bookkeeping"]
                                                                  + t["cpu_wait"])
    assert predictor_from_trace(trace, "oracle", 1).preds.shape == (300, 2, 1, CFG.num_local_experts)


def test_oracle_with_a_lookahead_past_the_last_layer_fills_only_rows_within_the_token(recorded):
    # bench cache --lookahead 12 on a 2-layer trace: the oracle has rows d = 1 only (L - 1), the rest NaN.
    _, trace = recorded
    pred = predictor_from_trace(trace, "oracle", 12)
    L = trace.routed_ids.shape[1]
    assert pred.preds.shape[2] == 12 and np.isfinite(pred.preds[:, : L - 1, 0]).all()
    assert np.isnan(pred.preds[:, :, L - 1:]).all() and np.isnan(pred.preds[:, L - 1]).all()


def test_simulate_charges_attention_peek_predictions(recorded):
    # A trace whose m2r2 adapters peek (meta "m2r2") costs one attention (+ the stand-in) per predicted
    # layer within the token of the projected model (not of the 2-layer trace), lookahead 1, beside the
    # adapters' own bytes (rank 0 here: only each row's target router) and a launch allowance per layer.
    import dataclasses

    _, trace = recorded
    cfg, hw = model_config("mixtral-8x7b"), get_hardware("rtx4090-pcie4")
    as_m2r2 = dataclasses.replace(trace, preds={"m2r2": trace.preds["next-gate"]})
    plain = simulate(as_m2r2, cfg, hw, "int4", 128, "m2r2", "lru-layer", deep_oracle_bound=False)
    assert plain.settings["predictor_ms_per_token"] == 0.0 and not plain.settings["predictor_charged"]
    peek = dataclasses.replace(as_m2r2, meta={"m2r2": {"attention_peek": True, "expert_rank": 64, "rank": 0}})
    p = simulate(peek, cfg, hw, "int4", 128, "m2r2", "lru-layer", deep_oracle_bound=False)
    costs = StepCosts.for_model(cfg, hw, "int4")
    row = costs.peek_row(cfg, hw, 64)
    assert row > costs.attention
    # Mixtral's 32 layers each predict min(1, 31 - l) layers ahead: 31 rows per token
    bw = hw.hbm_gbps * 1e9  # kernel efficiency 1 in this runtime's parameter set
    rows = 31 * (row + 2 * 4096 * 8 / bw + hw.kernel_overhead_us * 1e-6)
    assert p.settings["predictor_ms_per_token"] == pytest.approx(rows * 1e3)
    assert p.per_token["compute"] == pytest.approx(plain.per_token["compute"] + rows)
    assert p.tokens_per_second < plain.tokens_per_second
    none = simulate(peek, cfg, hw, "int4", 128, "none", "lru-layer", deep_oracle_bound=False)
    assert none.settings["predictor_ms_per_token"] == 0.0


def test_simulate_charges_the_adapters_bytes_per_row_and_heads_cost_less(recorded):
    # Hand-computed: Mixtral (H 4096, E 8), rank 64, context, no hint, lookahead 2, cross-token. Every
    # layer has 2 rows: within the token min(2, 31 - l), the rest past the last layer. A pair row reads
    # A, B, P, Q (4 x 64 x 4096 float32) and its router (4096 x 8 bf16); a cross head reads its [8, 64]
    # head and its router, plus the layer's trunk (XA, XP, XQ) once.
    import dataclasses

    _, trace = recorded
    cfg, hw = model_config("mixtral-8x7b"), get_hardware("rtx4090-pcie4")
    form = {"rank": 64, "context": True, "hint_experts": 0, "cross_token": True, "lookaheads": [1, 2]}
    m2r2 = dataclasses.replace(trace, preds={"m2r2": np.repeat(trace.preds["next-gate"], 2, axis=2)})
    costs = StepCosts.for_model(cfg, hw, "int4")
    bw, over = hw.hbm_gbps * 1e9, hw.kernel_overhead_us * 1e-6
    pair, router, head, trunk = 4 * 64 * 4096 * 4, 2 * 4096 * 8, 4 * 8 * 64, 4 * 64 * 4096 * 3
    per_token = {}
    for heads in (False, True):
        t = dataclasses.replace(m2r2, meta={"m2r2": {**form, "cross_heads": heads}})
        per_token[heads] = predictor_seconds(t, "m2r2", 2, costs, cfg, hw).sum() / t.routed_ids.shape[1] * 32
    # within-token rows: 30 layers x 2, layer 30 x 1, layer 31 x 0; the rest (1 + 2) cross rows
    assert per_token[False] == pytest.approx((64 * (pair + router)) / bw + 32 * over)
    assert per_token[True] == pytest.approx((61 * (pair + router) + 3 * (head + router) + 2 * trunk) / bw + 32 * over)
    assert per_token[True] < per_token[False]
    # an older meta without context / hint keys is charged as the v2 defaults (context and hint on)
    old = dataclasses.replace(m2r2, meta={"m2r2": {"rank": 64, "cross_token": True}})
    hinted = 4 * 64 * (4096 * 4 + 8)
    assert predictor_seconds(old, "m2r2", 2, costs, cfg, hw).sum() / old.routed_ids.shape[1] * 32 == pytest.approx(
        64 * (hinted + router) / bw + 32 * over)
