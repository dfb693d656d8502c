"""Predictors and prefetch: exact outputs, untrained m2r2 == next-gate, training helps, file checks."""

import random

import pytest
import torch

import moe_offload
from helpers import CFG, use_oracle, write_model
from moe_offload import MoeOffloadError
from moe_offload.offload import CopyFaults
from moe_offload.predict import Accelerator, M2R2Predictor, NextGate, model_fingerprint
from moe_offload.predict.train import train_accelerator
from moe_offload.analysis.trace import record_routing
from moe_offload.options import OffloadConfig

L, E, K = CFG.num_hidden_layers, CFG.num_local_experts, CFG.num_experts_per_tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random model, a random 'text', and adapters trained on it (lookahead 1)."""
    path = write_model(tmp_path_factory.mktemp("m"))
    m = moe_offload.load(path, device="cpu", offload=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, CFG.vocab_size, (2400,), generator=g).tolist()
    # The v1 adapter (no context: the random 'text' has none to read; context adapters are tested below),
    # distillation alone (no ranking term): the held-out distillation loss must fall.
    acc, report = train_accelerator(m.model, ids, lookaheads=[1], rank=8, epochs=3, lr=1e-2, window=32,
                                    show_progress=False, rank_weight=0.0, context=False)
    acc_file = tmp_path_factory.mktemp("a") / "acc.safetensors"
    acc.save(acc_file, {"fingerprint": model_fingerprint(m.model), "model": str(path)})
    return path, m, acc_file, report


def test_untrained_m2r2_reproduces_next_gate(setup):
    _, m, _, _ = setup
    acc = Accelerator(CFG.hidden_size, L, [1], rank=8)
    x = torch.randn(5, CFG.hidden_size)
    a = M2R2Predictor(m.model, acc, 1).scores(0, x)
    b = NextGate(m.model, 1, "residual").scores(0, x)
    # equal up to float32 rounding: m2r2 runs a layer's routers as one batched matmul, next-gate one by one
    torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(NextGate(m.model, 1).scores(L - 1, x)).all()  # nothing past the last layer


def test_training_lowers_heldout_loss_and_raises_recall(setup):
    _, _, _, report = setup
    before, after = report["heldout_before"], report["heldout_after"]
    assert after["loss"] < before["loss"]
    assert before["recall"]["m2r2"]["d1"] == before["recall"]["next-gate"]["d1"]  # untrained == next-gate
    assert after["recall"]["m2r2"]["d1"]["top_k"] > before["recall"]["m2r2"]["d1"]["top_k"]


def test_accelerator_for_another_model_is_rejected(setup, tmp_path):
    _, _, acc_file, _ = setup
    other = moe_offload.load(write_model(tmp_path, seed=1), device="cpu", offload=False)
    with pytest.raises(MoeOffloadError, match="trained for a different model"):
        Accelerator.load(acc_file, other.model)
    with pytest.raises(MoeOffloadError, match="trained for a different model"):
        moe_offload.load(tmp_path, device="cpu", predictor="m2r2", config=OffloadConfig.make(accelerator=acc_file))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MoeOffloadError, match="not a moe_offload accelerator file"):
        Accelerator.load(tmp_path / "junk.safetensors", other.model)


def oracle_for(m, prompt, n_new):
    """Trace of the whole sequence the resident model will produce: the oracle's knowledge."""
    seq = prompt + m.generate(prompt, max_new_tokens=n_new).token_ids
    return record_routing(m.model, seq, window=m.runtime.max_seq_len)


@pytest.mark.parametrize("predictor", ["none", "next-gate", "m2r2", "oracle"])
def test_every_predictor_keeps_outputs_exact(setup, predictor):
    path, ref, acc_file, _ = setup
    prompt = [1, 7, 3, 9, 11, 4]
    expected = ref.generate(prompt, max_new_tokens=12).token_ids
    extra = {"accelerator": acc_file} if predictor == "m2r2" else {}
    for policy, slots in (("lru", 3), ("predictive", 3), ("lfu", 5)):
        m = moe_offload.load(path, config=OffloadConfig.make(
            device="cpu", cache_experts=slots, policy=policy, lookahead=None if predictor == "none" else 1,
            predictor="next-gate" if predictor == "oracle" else predictor, **extra))
        if predictor == "oracle":
            use_oracle(m, oracle_for(ref, prompt, 12))
        rng = random.Random(1)
        m.expert_cache.engine.faults = CopyFaults(delay=lambda key: rng.uniform(0, 0.002))
        res = m.generate(prompt, max_new_tokens=12)
        assert res.token_ids == expected, (predictor, policy)
        st = res.stats
        assert st["predictor"] == predictor and st["hits"] + st["misses"] == st["uses"]
        if predictor != "none":
            assert st["prefetch_issued"] > 0
        assert torch.equal(m.logits(prompt), ref.logits(prompt))


def test_oracle_prefetch_leaves_no_demand_misses_after_warmup(setup):
    path, ref, _, _ = setup
    prompt = [1]
    trace = oracle_for(ref, prompt, 16)
    # A window of 2 * k: the prefetcher runs once per layer and must keep a whole layer ahead.
    m = moe_offload.load(path, device="cpu", predictor="next-gate",
                         config=OffloadConfig.make(cache_experts=6, lookahead=1, prefetch_margin=0))
    use_oracle(m, trace)
    m.prefetcher.max_inflight = 2 * K
    res = m.generate(prompt, max_new_tokens=16)
    assert res.token_ids == trace.token_ids[1:].tolist()
    # Only the first forward (the 1-token prompt's layer 0, before any prediction existed) may miss.
    assert res.stats["misses"] <= K
    assert res.stats["per_layer"][1]["misses"] == 0
    without = moe_offload.load(path, device="cpu", predictor="none", config=OffloadConfig.make(cache_experts=6)).generate(prompt, max_new_tokens=16)
    assert without.stats["misses"] > 2 * K  # the same cache without the oracle does miss


def test_bad_predictor_options(setup):
    path, _, _, _ = setup
    for kw, needle in [({"predictor": "magic"}, "predictor must be one of"),
                       ({"predictor": "m2r2"}, "needs accelerator=FILE"),
                       ({"predictor": "oracle"}, "predictor must be one of"),
                       ({"lookahead": 0}, r"tuning.lookahead must be >= 1, got 0"),
                       ({"lookahead": 5}, r"tuning.lookahead must be in \[1, 4\] for this model"),
                       ({"prefetch_margin": -1}, "tuning.prefetch_margin must be >= 0"),
                       ({"prefetch_margin": 3}, r"tuning.prefetch_margin must be in \[0, 2\]"),
                       ({"prefetch_window": 0}, "unknown setting 'prefetch_window'")]:
        with pytest.raises(MoeOffloadError, match=needle):
            moe_offload.load(path, config=OffloadConfig.make(device="cpu", cache_experts=3, **kw))


def test_next_gate_earns_more_prefetch_hits_than_random_scores(monkeypatch):
    # The bundled (trained) model, half the experts resident: next-gate's prefetches must be used far
    # more often than those of a predictor that scores at random (same cache, same text).
    def prefetch_hits():
        m = moe_offload.load(device="cpu", cache_per_layer=4, predictor="next-gate", config=OffloadConfig.make(lookahead=2))
        st = m.generate("And God said, Let there be light", max_new_tokens=48).stats
        return st["prefetch_hits"], st["prefetch_issued"]

    hits, issued = prefetch_hits()
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(NextGate, "scores", lambda self, layer, x, start_pos=0: torch.rand(
        x.shape[0], self.lookahead, self.model.cfg.num_local_experts, generator=g))
    rand_hits, rand_issued = prefetch_hits()
    assert issued > 50 and rand_issued > 50
    assert hits / issued > 1.5 * rand_hits / rand_issued, (hits, issued, rand_hits, rand_issued)


def test_topk_ranking_loss_prefers_the_true_set_on_top():
    from moe_offload.predict.train import topk_ranking_loss

    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])  # true top-2 = {0, 1}
    good = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    bad = torch.tensor([[0.0, 2.0, 3.0, 0.0]])
    assert topk_ranking_loss(good, probs, 2) < topk_ranking_loss(bad, probs, 2)
    # By hand: the strongest outsider is 0; mean(softplus(0 - 3), softplus(0 - 2)).
    sp = torch.nn.functional.softplus
    want = (sp(torch.tensor(-3.0)) + sp(torch.tensor(-2.0))) / 2
    assert topk_ranking_loss(good, probs, 2).item() == pytest.approx(want.item())


def test_topk_ranking_loss_does_not_grow_with_the_number_of_experts():
    """The same ranking (true top-8 one logit above every outsider) costs the same at 16 and 128 experts:
    a loss against the log-sum-exp of the outsiders grew with E and wrecked training at 128 experts."""
    from moe_offload.predict.train import topk_ranking_loss

    losses = []
    for E in (16, 128):
        logits = torch.zeros(1, E)
        logits[0, :8] = 1.0
        probs = torch.softmax(logits * 5, dim=-1)
        losses.append(topk_ranking_loss(logits, probs, 8).item())
    assert losses[0] == pytest.approx(losses[1]) and losses[0] < 0.32  # softplus(-1) = 0.313



def _v1_scores(m, A, B, layer, x):
    """The v1 adapter's prediction, written out: layer+1's router on x + B·silu(A·rms(x))."""
    from moe_offload.model.layers import rms_norm
    z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    r = x + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(z, A)), B)
    t = m.model.layers[layer + 1]
    return torch.softmax(torch.nn.functional.linear(rms_norm(r, t.post_attention_layernorm, m.model.cfg.rms_norm_eps), t.gate), -1)


def test_v1_file_without_context_loads_and_predicts_as_before(setup, tmp_path):
    # A file written before the context part (P, Q): only A/B tensors and v1 metadata.
    import json
    from safetensors.torch import save_file
    from moe_offload.predict.accelerator import META_KEY

    _, m, _, _ = setup
    g = torch.Generator().manual_seed(3)
    pairs = [(l, 1) for l in range(L - 1)]
    tensors = {f"{n}.{l}_{d}": torch.randn(*shape, generator=g) * 0.3 for l, d in pairs
               for n, shape in (("A", (8, CFG.hidden_size)), ("B", (CFG.hidden_size, 8)))}
    meta = {"fingerprint": model_fingerprint(m.model), "lookaheads": [1], "rank": 8,
            "hidden": CFG.hidden_size, "num_layers": L}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={META_KEY: json.dumps(meta)})
    acc, _ = Accelerator.load(tmp_path / "v1.safetensors", m.model)
    assert acc.param_groups() == ("A", "B")
    x = torch.randn(7, CFG.hidden_size, generator=g)
    pred = M2R2Predictor(m.model, acc, 1)
    for layer in range(L - 1):
        want = _v1_scores(m, tensors[f"A.{layer}_1"], tensors[f"B.{layer}_1"], layer, x)
        torch.testing.assert_close(pred.scores(layer, x)[:, 0], want, rtol=1e-5, atol=1e-6)


def test_files_with_the_retired_router_hint_or_norm_gain_are_refused(setup, tmp_path):
    import json
    from safetensors.torch import save_file
    from moe_offload.predict.accelerator import META_KEY

    _, m, _, _ = setup
    for key, value in (("hint_experts", 8), ("gain", True)):
        meta = {"fingerprint": model_fingerprint(m.model), "lookaheads": [1], "rank": 8, "hidden": CFG.hidden_size,
                "num_layers": L, key: value}
        f = tmp_path / f"{key}.safetensors"
        save_file({"A.0_1": torch.zeros(8, CFG.hidden_size)}, str(f), metadata={META_KEY: json.dumps(meta)})
        with pytest.raises(MoeOffloadError, match=f"router hint or norm gain \\({key}\\) are no longer read"):
            Accelerator.load(f, m.model)


def test_context_rows_match_the_recurrence():
    from moe_offload.predict.accelerator import CONTEXT_DECAY, context_rows

    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 6, generator=g)  # more than one block of the recurrence
    prev, m, want = torch.zeros(6), torch.zeros(6), []
    for row in x:
        want.append(torch.cat([prev, m]))
        m = CONTEXT_DECAY * m + (1 - CONTEXT_DECAY) * row
        prev = row
    ctx, state = context_rows(x)
    torch.testing.assert_close(ctx, torch.stack(want))
    torch.testing.assert_close(state[0][0], x[-1]) and torch.testing.assert_close(state[1][0], m)
    a, s1 = context_rows(x[:70])  # in two chunks, the state carried
    b, _ = context_rows(x[70:], s1)
    torch.testing.assert_close(torch.cat([a, b]), ctx)


def test_prev_context_predictor_carries_the_previous_row_across_chunks(setup, tmp_path):
    # Context adapters read earlier positions: scoring a sequence whole, or as a prefill chunk followed by
    # one-row decode steps, gives the same scores; a gap in positions reads a zero context.
    path, m, _, _ = setup
    acc = Accelerator(CFG.hidden_size, L, [1, 2], rank=8, context=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in ("B", "P", "Q"):
            for p in getattr(acc, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(9, CFG.hidden_size, generator=g)
    whole = M2R2Predictor(m.model, acc, 2)
    pieces = M2R2Predictor(m.model, acc, 2)
    for layer in range(L - 1):
        want = whole.scores(layer, x, 0)
        pieces.observe(layer, x[:5], 0)  # prefill, as the prefetcher sees it
        got = [pieces.scores(layer, x[:5], 0)]
        for i in range(5, 9):
            row = x[i:i + 1]
            pieces.observe(layer, row, i)
            got.append(pieces.scores(layer, row, i))
        torch.testing.assert_close(torch.cat(got), want, equal_nan=True)
    gap = M2R2Predictor(m.model, acc, 2)
    gap.scores(0, x[:5], 0)
    torch.testing.assert_close(gap.scores(0, x[6:7], 6), whole.scores(0, x[6:7], 0), equal_nan=True)  # zero prev
    after_row5 = M2R2Predictor(m.model, acc, 2)
    assert not torch.allclose(gap.scores(0, x[6:7], 6)[:, 0], after_row5.scores(0, x[5:7], 5)[1:, 0])  # prev matters
    acc.save(tmp_path / "ctx.safetensors", {"fingerprint": model_fingerprint(m.model), "model": str(path)})
    loaded, meta = Accelerator.load(tmp_path / "ctx.safetensors", m.model)
    assert meta["context"] is True and loaded.context
    torch.testing.assert_close(M2R2Predictor(m.model, loaded, 2).scores(0, x, 0), whole.scores(0, x, 0), rtol=0, atol=0,
                               equal_nan=True)
    with pytest.raises(MoeOffloadError, match="previous positions"):
        acc.accelerate(0, 1, x)
    # Decoding with context adapters through the prefetcher stays exact.
    prompt = [1, 7, 3, 9]
    m2 = moe_offload.load(path, device="cpu", predictor="m2r2", config=OffloadConfig.make(cache_experts=3, lookahead=2, accelerator=tmp_path / "ctx.safetensors"))
    res = m2.generate(prompt, max_new_tokens=8)
    assert res.token_ids == m.generate(prompt, max_new_tokens=8).token_ids and res.stats["prefetch_issued"] > 0


def test_predictor_stacks_share_the_adapters_storage(setup, tmp_path):
    # The predictor's stacked weights are the adapters' own storage (held once), an in-place change to an
    # adapter reaches a predictor built before it, and the adapters still save and train afterwards.
    _, m, _, _ = setup
    g = torch.Generator().manual_seed(5)
    acc = Accelerator(CFG.hidden_size, L, [1, 2], rank=4, context=True, cross_token=True, cross_heads=True,
                      num_experts=E)
    with torch.no_grad():
        for p in acc.parameters():
            p.normal_(0, 0.2, generator=g)
    opt = torch.optim.Adam(acc.parameters(), lr=1e-2)  # made before the predictor re-points the tensors
    x = torch.randn(6, CFG.hidden_size, generator=g)
    pred = M2R2Predictor(m.model, acc, 2)
    pred.scores(0, x)
    pred.scores(L - 1, x)  # a layer with cross heads
    st, sx = pred._stacks[0], pred._stacks[L - 1]
    assert acc.A["0_1"].untyped_storage().data_ptr() == st["A"].untyped_storage().data_ptr()
    assert acc.B["0_1"].untyped_storage().data_ptr() == st["Bt"].untyped_storage().data_ptr()
    assert acc.XH["0_2"].untyped_storage().data_ptr() == st["XH"].untyped_storage().data_ptr()
    assert acc.XH[f"{L - 1}_1"].untyped_storage().data_ptr() == sx["XH"].untyped_storage().data_ptr()
    before = pred.scores(0, x, 0)
    with torch.no_grad():
        acc.B["0_1"].mul_(3.0)
        acc.XH["0_2"].add_(0.5)
    after = pred.scores(0, x, 0)
    assert not torch.equal(after, before)
    fresh = Accelerator(CFG.hidden_size, L, [1, 2], rank=4, context=True, cross_token=True, cross_heads=True,
                        num_experts=E)
    fresh.load_state_dict(acc.state_dict())
    torch.testing.assert_close(after, M2R2Predictor(m.model, fresh, 2).scores(0, x, 0), rtol=0, atol=0, equal_nan=True)
    acc.save(tmp_path / "a.safetensors", {"fingerprint": model_fingerprint(m.model)})  # views: saved as copies
    loaded, _ = Accelerator.load(tmp_path / "a.safetensors", m.model)
    torch.testing.assert_close(M2R2Predictor(m.model, loaded, 2).scores(0, x, 0), after, rtol=0, atol=0, equal_nan=True)
    # an optimizer made before the stacking still trains the tensors the predictor reads
    from moe_offload.predict.accelerator import context_rows

    loss = acc.accelerate(0, 1, x, prev=context_rows(x)[0]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(pred.scores(0, x, 0), after)
