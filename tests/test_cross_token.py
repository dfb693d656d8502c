"""Cross-token prediction: adapters whose rows reach the next token's layers, their training and
recall, the prefetcher carrying their plan across the token boundary, and ranked eviction."""

import numpy as np
import pytest
import torch

import moe_offload
from helpers import CFG, write_model
from moe_offload.analysis.bench import predictor_from_trace, trace_recall
from moe_offload.analysis.sim import RecordedPredictor, StepCosts, run_timeline
from moe_offload.analysis.trace import RoutingTrace
from moe_offload.offload.cache import ExpertCache
from moe_offload.offload.policy import make_policy
from moe_offload.offload.prefetch import Prefetcher
from moe_offload.analysis.sim import SimCopyEngine, VirtualClock, VirtualStore
from moe_offload import MoeOffloadError
from moe_offload.predict import Accelerator, M2R2Predictor, NextGate, model_fingerprint
from moe_offload.predict.predictors import router_probs
from moe_offload.predict.train import adapter_loss, train_accelerator, true_router_probs
from moe_offload.model.layers import rms_norm
from moe_offload.options import OffloadConfig

L, E, K = CFG.num_hidden_layers, CFG.num_local_experts, CFG.num_experts_per_tok


def test_cross_token_pairs_and_targets():
    plain = Accelerator(16, 3, [1, 2, 3, 4], rank=4)
    cross = Accelerator(16, 3, [1, 2, 3, 4], rank=4, cross_token=True)
    assert plain.pairs == [(0, 1), (0, 2), (1, 1)]
    assert len(cross.pairs) == 12
    assert [cross.target(2, d) for d in (1, 2, 3, 4)] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    assert cross.target(0, 2) == (0, 2)


def test_untrained_cross_rows_are_the_target_routers_on_todays_residual(tmp_path):
    # B = 0: a cross-token row for layer t of the next token is layer t's router on the current
    # residual (next-gate's form); rows a plain adapter set cannot reach stay NaN.
    m = moe_offload.load(write_model(tmp_path), device="cpu", offload=False)
    x = torch.randn(3, CFG.hidden_size)
    cross = M2R2Predictor(m.model, Accelerator(CFG.hidden_size, L, [1, 2, 3], rank=4, cross_token=True), 3)
    plain = M2R2Predictor(m.model, Accelerator(CFG.hidden_size, L, [1, 2, 3], rank=4), 3)
    assert cross.cross_token and not plain.cross_token
    s = cross.scores(L - 1, x)  # [3, D, E]: all rows land in later tokens (L = 2)
    assert torch.isfinite(s).all()
    for d in (1, 2, 3):
        t = (L - 1 + d) % L
        want = router_probs(m.model, t, rms_norm(x, m.model.layers[t].post_attention_layernorm, CFG.rms_norm_eps))
        torch.testing.assert_close(s[:, d - 1], want)
    torch.testing.assert_close(cross.scores(0, x)[:, 0], NextGate(m.model, 1).scores(0, x)[:, 0])
    assert torch.isnan(plain.scores(L - 1, x)).all()


def test_cross_token_loss_reads_the_next_positions_targets(tmp_path):
    # The loss of a cross-token pair compares position p's prediction with position p+1's router: a
    # perturbation of the last position's layer-0 input changes no cross-token target of the pair
    # (1, 1), whose inputs are positions 0..T-2 and targets positions 1..T-1 at layer 0.
    m = moe_offload.load(write_model(tmp_path), device="cpu", offload=False)
    acc = Accelerator(CFG.hidden_size, L, [1], rank=4, cross_token=True)
    xs = torch.randn(6, L, CFG.hidden_size)
    probs = true_router_probs(m.model, xs)
    acc.pairs = [(1, 1)]  # only the cross-token pair
    base = adapter_loss(m.model, acc, xs, probs)
    xs2 = xs.clone()
    xs2[-1, 1] += 5.0  # the last position's layer-1 input: not an input of any (1, 1) term
    assert torch.equal(adapter_loss(m.model, acc, xs2, true_router_probs(m.model, xs2)), base)
    xs3 = xs.clone()
    xs3[0, 0] += 5.0  # position 0's layer 0: never a target of (1, 1) (targets start at position 1)
    assert torch.equal(adapter_loss(m.model, acc, xs3, true_router_probs(m.model, xs3)), base)
    xs4 = xs.clone()
    xs4[1, 0] += 5.0  # position 1's layer 0: the target of position 0's prediction
    assert not torch.equal(adapter_loss(m.model, acc, xs4, true_router_probs(m.model, xs4)), base)


@pytest.fixture(scope="module")
def bundled_cross(tmp_path_factory):
    """Cross-token adapters trained on the bundled model: the rows past the last layer as logit heads
    on a shared trunk per layer (per-pair residual rows are only read from older files)."""
    from moe_offload.runtime import bundled_heldout_text

    m = moe_offload.load(device="cpu", offload=False)
    ids = m.encode_text(bundled_heldout_text().read_text(encoding="utf-8"))[:6000]
    Lb = m.model.cfg.num_hidden_layers
    acc, report = train_accelerator(m.model, ids, lookaheads=list(range(1, Lb + 1)), rank=16, epochs=2, lr=1e-2,
                                    window=128, show_progress=False, cross_token=True)
    f = tmp_path_factory.mktemp("x") / "cross.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model), "model": str(m.path)})
    return m, acc, report, f


def test_cross_token_training_raises_next_token_recall_above_untrained_and_repeat(bundled_cross):
    _, _, report, _ = bundled_cross
    before, after = report["heldout_before"]["recall"], report["heldout_after"]["recall"]
    assert report["cross_token"] is True
    for cell in ("d1-later", "d3-later", "d6-later"):
        assert after["m2r2"][cell]["top_k"] > before["m2r2"][cell]["top_k"] + 0.03, (cell, before, after)
        assert after["m2r2"][cell]["top_k"] > after["repeat"][cell]["top_k"] + 0.05, (cell, after)
    assert "d1-later" not in after["next-gate"]  # next-gate has no rows past the last layer


def test_cross_token_file_round_trip_and_exact_decoding(bundled_cross):
    m, acc, _, f = bundled_cross
    loaded, meta = Accelerator.load(f, m.model)
    assert meta["cross_token"] is True and loaded.cross_token
    x = torch.randn(2, m.model.cfg.hidden_size)
    Lb = m.model.cfg.num_hidden_layers
    torch.testing.assert_close(M2R2Predictor(m.model, loaded, Lb).scores(Lb - 1, x),
                               M2R2Predictor(m.model, acc, Lb).scores(Lb - 1, x), rtol=0, atol=0)
    prompt = m.encode("And God said")
    want = m.generate(prompt, max_new_tokens=10).token_ids
    for policy in ("predictive", "lru-layer"):
        off = moe_offload.load(device="cpu", cache_per_layer=3, predictor="m2r2",
                               config=OffloadConfig.make(policy=policy, lookahead=Lb, accelerator=f))
        off.prefetcher.max_inflight = 2
        res = off.generate(prompt, max_new_tokens=10)
        assert res.token_ids == want and res.stats["prefetch_issued"] > 0, policy


class FakeCross:
    """Scores by hand: rows past the last layer are the next token's layers."""

    name, lookahead, cross_token = "fake", 3, True

    def __init__(self, rows):
        self.rows = rows  # [D, E]

    def scores(self, layer, x, start_pos):
        return torch.tensor(self.rows, dtype=torch.float32)[None]

    def observe(self, layer, x, start_pos):
        pass

    def first_layers(self, token_id, pos, take):
        return np.array([[3, 2]])[:, :take]  # layer 0 only


def sim_cache(L_, E_, slots, policy):
    clock = VirtualClock()
    eng = SimCopyEngine(clock, 1.0, 100)
    return ExpertCache(VirtualStore(L_, E_, 100), slots, make_policy(policy), torch.device("cpu"), eng)


def test_plan_from_the_last_layer_is_kept_behind_the_next_tokens_first_layers():
    # 2 layers, 4 experts, top-1. At layer 1 (the last) the predictor scores the next token's layers
    # 0, 1 and (d = 3) the layer 0 of the token after. At the next token's start the embedding's
    # layer-0 guess comes first, the carried plan after it, at the same distances.
    cache = sim_cache(2, 4, 8, "predictive")
    rows = [[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.2], [0.7, 0.0, 0.0, 0.3]]
    pf = Prefetcher(cache, FakeCross(rows), 2, 1, max_inflight=8)
    x = torch.zeros(1, 4)
    pf.on_residual(1, x, 0)
    pf.issue(1, pf.predict(1).numpy())
    # distances from the next token's start: its layer 0 at 1, layer 1 at 2, the following token's layer 0 at 3
    assert pf._ahead == [((0, 1), 1), ((1, 2), 2), ((0, 0), 3)]
    pf.on_step(None, 1, [5])
    assert pf._plan == [((0, 3), 1), ((0, 1), 1), ((1, 2), 2), ((0, 0), 3)]
    assert (pf.value[(0, 3)], pf.value[(0, 1)], pf.value[(1, 2)]) == (1.0, 0.5, 0.5)  # the carried guess ranks second
    # a plain (not cross-token) predictor's plan is not carried
    pf2 = Prefetcher(sim_cache(2, 4, 8, "predictive"), FakeCross(rows), 2, 1)
    pf2.cross_token = False
    pf2.on_residual(0, x, 0)
    pf2.issue(0, pf2.predict(0).numpy())
    pf2.on_step(None, 1, [5])
    assert [key for key, _ in pf2._plan] == [(0, 3)]


def test_rank_depth_ranks_for_eviction_without_loading():
    # depth 4 > take 1: one load per predicted layer, but every expert of it gets an expected next use
    # (distance / P(use), P halving per rank past top_k) in the predictive policy.
    cache = sim_cache(2, 4, 8, "predictive")
    pf = Prefetcher(cache, FakeCross([[0.1, 0.9, 0.05, 0.0]] * 3), 2, 1, max_inflight=4, rank_depth=4)
    pf.cross_token = False
    pf.on_residual(0, torch.zeros(1, 4), 0)
    ids = pf.predict(0).numpy()
    assert ids.tolist() == [1, 0, 2, 3]  # the one row that stays within the token (layer 1), ranked whole
    pf.issue(0, ids)
    assert pf.pending == [] and pf.issued == 1 and (1, 1) in cache.inflight  # only the top-1 was loaded
    nu = cache.policy.next_use
    assert nu == {(1, 1): 1.0, (1, 0): 2.0, (1, 2): 4.0, (1, 3): 8.0}
    assert pf.protect == {(1, 1)}
    with pytest.raises(ValueError, match="rank_depth"):
        Prefetcher(cache, FakeCross([[0.0] * 4]), 2, 1, rank_depth=0)


def test_a_key_planned_twice_keeps_its_most_valuable_use():
    cache = sim_cache(2, 4, 8, "predictive")
    pf = Prefetcher(cache, FakeCross([[0.0] * 4]), 2, 1, max_inflight=1, rank_depth=4)
    # (0, 2) ranked last at distance 1, first at distance 3
    pf._set_plan([((0, 0), 1), ((0, 1), 1), ((0, 3), 1), ((0, 2), 1), ((0, 2), 3)])
    assert pf.value[(0, 2)] == pytest.approx(1 / 3)
    assert dict(pf._plan)[(0, 2)] == 3


def test_trace_recall_scores_cross_rows_against_the_next_tokens_routing():
    # 3 tokens, 2 layers, 4 experts, k = 1. The predictor's row d = 1 at layer 1 names the next
    # token's layer-0 expert for token 0 (right) and token 1 (wrong).
    routed = np.array([[[0], [1]], [[2], [3]], [[1], [0]]], dtype=np.int16)
    preds = np.full((3, 2, 1, 4), np.nan, dtype=np.float32)
    preds[:, 0, 0] = np.eye(4)[[1, 3, 0]]  # within the token: layer 1's expert, all right
    preds[0, 1, 0], preds[1, 1, 0], preds[2, 1, 0] = np.eye(4)[2], np.eye(4)[0], np.eye(4)[1]
    tr = RoutingTrace(np.arange(3), routed, np.ones((3, 2, 1), np.float32), 8,
                      np.full((3, 2, 4), 0.25, np.float32), {"m2r2": preds})
    rec = trace_recall(tr)["m2r2"]
    assert rec["d1"]["top_k"] == 1.0 and rec["d1-later"]["top_k"] == 0.5
    assert predictor_from_trace(tr, "m2r2").cross_token
    plain = {"m2r2": preds.copy()}
    plain["m2r2"][:, 1] = np.nan
    tr2 = RoutingTrace(np.arange(3), routed, np.ones((3, 2, 1), np.float32), 8, tr.router_probs, plain)
    assert not predictor_from_trace(tr2, "m2r2").cross_token and "d1-later" not in trace_recall(tr2)["m2r2"]


def test_cross_token_plans_in_the_timeline_beat_the_same_predictor_within_the_token():
    # A perfect predictor of the next 3 steps (the trace's own future, crossing tokens) on a 3-layer trace:
    # with its cross-token rows it misses far less than with the same rows cut at the token's end
    # (cross_token False), and far less than no prediction; every use is a hit or a miss.
    rng = np.random.default_rng(0)
    T, Lt, Et = 60, 3, 6
    ids = np.stack([np.stack([rng.choice(Et, 2, replace=False) for _ in range(Lt)]) for _ in range(T)]).astype(np.int16)
    truth = np.zeros((T * Lt + Lt, Et), np.float32)
    np.put_along_axis(truth[: T * Lt], ids.reshape(T * Lt, 2).astype(np.int64), 1.0, axis=1)
    steps = np.arange(T * Lt)[:, None] + np.arange(1, Lt + 1)[None]
    preds = truth[steps].reshape(T, Lt, Lt, Et)  # [T, L, D, E]
    within = preds.copy()
    for layer in range(Lt):
        within[:, layer, Lt - 1 - layer:] = np.nan
    costs = StepCosts(attention=1.0, expert=1.0, bookkeeping=0.0, head=0.0, copy=0.5, expert_bytes=100)
    runs = {name: run_timeline(ids, Et, 3 * Lt, "predictive", costs, pred, window=1, rank_depth=Et)
            for name, pred in (("cross", RecordedPredictor("f", preds, None, cross_token=True)),
                               ("within", RecordedPredictor("f", within, None)))}
    runs["none"] = run_timeline(ids, Et, 3 * Lt, "predictive", costs)
    for r in runs.values():
        assert r.stats["hits"] + r.stats["misses"] == r.stats["uses"]
    assert runs["cross"].stats["misses"] * 10 < runs["within"].stats["misses"] < runs["none"].stats["misses"]


@pytest.mark.parametrize("heads", [False, True])
def test_stacked_scores_equal_the_per_adapter_reference(tmp_path, heads):
    # M2R2Predictor runs a layer's adapters stacked (one matmul per part, one batched router); each row
    # must equal adapter (l, d) alone through its target layer's norm and router, within float32 rounding,
    # with every optional part (context) and rows in this token and the next ones; with cross
    # heads, layer 0 mixes a residual row (d = 1) with head rows (d = 2, 3), each equal to head_logits.
    m = moe_offload.load(write_model(tmp_path), device="cpu", offload=False)
    acc = Accelerator(CFG.hidden_size, L, [1, 2, 3], rank=4, context=True, cross_token=True, cross_heads=heads,
                      num_experts=E)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in acc.param_groups():
            for p in getattr(acc, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(4, CFG.hidden_size, generator=g)
    from moe_offload.predict.accelerator import context_rows

    pred = M2R2Predictor(m.model, acc, 3)
    for layer in range(L):
        got = pred.scores(layer, x, 0)  # [4, 3, E]
        prev = context_rows(x)[0]
        for d in (1, 2, 3):
            _, t = acc.target(layer, d)
            if acc.is_head(layer, d):
                torch.testing.assert_close(got[:, d - 1], torch.softmax(acc.head_logits(m.model, layer, d, x, prev), -1))
                continue
            r = acc.accelerate(layer, d, x, prev)
            w = m.model.layers[t].post_attention_layernorm
            want = router_probs(m.model, t, rms_norm(r, w, CFG.rms_norm_eps))
            torch.testing.assert_close(got[:, d - 1], want)


def test_cross_token_adapters_set_their_own_lookahead_and_rank_depth(bundled_cross):
    m, _, _, f = bundled_cross
    Lb, Eb = m.model.cfg.num_hidden_layers, m.model.cfg.num_local_experts
    pf = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(policy="predictive", accelerator=f)).model.experts.prefetcher
    assert (pf.lookahead, pf.depth, pf.cross_token) == (Lb, min(Eb, 4 * m.model.cfg.num_experts_per_tok), True)
    pf = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(policy="lru-layer", accelerator=f)).model.experts.prefetcher
    assert (pf.lookahead, pf.depth) == (Lb, m.model.cfg.num_experts_per_tok)  # lru-layer: deeper ranks unused
    pf = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(policy="predictive", accelerator=f, lookahead=2)).model.experts.prefetcher
    assert (pf.lookahead, pf.depth) == (2, min(Eb, 4 * m.model.cfg.num_experts_per_tok))
    pf = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(policy="predictive")).model.experts.prefetcher  # shipped file
    assert (pf.lookahead, pf.depth, pf.cross_token) == (2, m.model.cfg.num_experts_per_tok, False)


def test_a_prefetch_never_evicts_a_resident_needed_no_later_than_itself():
    # Two slots hold (0, 0) and (0, 1). The plan ranks layer 0 deeper than it loads: (0, 0) is expected
    # 2 layers ahead (rank 2 at distance 1). Prefetching (1, 3), also expected in 2, would have to
    # evict it: the prefetcher leaves it resident instead.
    cache = sim_cache(2, 4, 2, "predictive")
    cache.acquire(0, [0, 1])
    cache.release(0, [0, 1])
    pf = Prefetcher(cache, FakeCross([[0.0] * 4]), 2, 1, max_inflight=2, rank_depth=4)
    pf._set_plan([((0, 1), 1), ((0, 0), 1), ((0, 2), 1), ((0, 3), 1), ((1, 3), 2)])
    assert cache.policy.next_use[(0, 0)] == 2.0 and cache.policy.next_use[(1, 3)] == 2.0
    assert pf.issued == 0 and cache.is_resident(0, 0) and not cache.is_resident(1, 3)
    pf._set_plan([((1, 3), 1), ((0, 1), 2), ((0, 2), 3), ((0, 0), 3)])  # (1, 3) first, (0, 0) in 6: evictable
    assert pf.issued == 1 and not cache.is_resident(0, 0) and cache.is_resident(1, 3)


def test_cross_heads_share_a_trunk_and_start_as_the_target_routers(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu", offload=False)
    H = CFG.hidden_size
    heads = Accelerator(H, L, [1, 2, 3], rank=4, context=True, cross_token=True, cross_heads=True, num_experts=E)
    pairs = Accelerator(H, L, [1, 2, 3], rank=4, context=True, cross_token=True)
    assert heads.pairs == pairs.pairs and heads.residual_pairs == [(0, 1)]  # L = 2: one row within the token
    assert sorted(heads.XH) == ["0_2", "0_3", "1_1", "1_2", "1_3"] and sorted(heads.XA) == ["0", "1"]
    assert heads.XH["1_1"].shape == (E, 4)
    x = torch.randn(3, H)
    # zero heads: each row is its target layer's router on today's residual, as an untrained adapter
    torch.testing.assert_close(M2R2Predictor(m.model, heads, 3).scores(1, x), M2R2Predictor(m.model, pairs, 3).scores(1, x))
    with torch.no_grad():
        for p in heads.XH.values():
            p.normal_()
    got = M2R2Predictor(m.model, heads, 3).scores(1, x)  # stacked, with the context of position 0 (zero)
    prev = torch.zeros(3, 2 * H)
    for d in (1, 2, 3):
        torch.testing.assert_close(got[:, d - 1], torch.softmax(heads.head_logits(m.model, 1, d, x, prev), -1))
    with pytest.raises(MoeOffloadError, match="cross_heads needs cross_token"):
        Accelerator(H, L, [1], rank=4, cross_heads=True, num_experts=E)


def test_with_the_cpu_lane_auto_prefetches_only_cross_token_plans_at_margin_3(bundled_cross):
    # hybrid_prefetch.json: with the CPU lane and lru-layer, within-token prefetch loses (auto turns it
    # off, saying so; under lru it still gains and stays on) and cross-token plans pay best at margin 3;
    # what the user asks for is kept.
    _, _, _, f = bundled_cross
    kw = dict(device="cpu", cache_per_layer=4, policy="lru-layer")
    shipped = moe_offload.load(config=OffloadConfig.make(cpu_experts="auto", **kw)).model.experts
    assert shipped.prefetcher is None and "CPU lane" in shipped.prefetch_note
    assert moe_offload.load(config=OffloadConfig.make(cpu_experts="auto", predictor="m2r2", **kw)).model.experts.prefetcher.margin == 0
    assert moe_offload.load(config=OffloadConfig.make(**kw)).model.experts.prefetcher.margin == 0  # no lane: as before
    lru = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(cpu_experts="auto")).model.experts  # policy lru: kept
    assert lru.prefetcher is not None and lru.prefetcher.margin == 0
    cross = moe_offload.load(config=OffloadConfig.make(cpu_experts="auto", accelerator=f, **kw)).model.experts.prefetcher
    assert cross.cross_token and cross.margin == 3
    assert moe_offload.load(config=OffloadConfig.make(accelerator=f, **kw)).model.experts.prefetcher.margin == 0
    assert moe_offload.load(config=OffloadConfig.make(cpu_experts="auto", accelerator=f, prefetch_margin=1, **kw)).model.experts.prefetcher.margin == 1
