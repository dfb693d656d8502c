"""Attention-peek adapters: the later layer's real attention on an estimated residual (exact when the
estimate is exact, in every cache mode, never writing the cache), the chain with expert stand-ins, the
runtime's decode predictions equal to the trace's and training's view, training, files, exact decoding."""

import dataclasses

import pytest
import torch

import moe_offload
from helpers import CFG, write_model
from moe_offload import MoeOffloadError
from moe_offload.analysis.trace import record_with_predictions
from moe_offload.model.layers import rms_norm
from moe_offload.model.observers import Observer, observing
from moe_offload.model.transformer import KVCache, RowPositions
from moe_offload.predict import Accelerator, M2R2Predictor, model_fingerprint
from moe_offload.predict import accelerator as accelerator_module
from moe_offload.predict.peek import peek_attention
from moe_offload.predict.train import collect_window, expert_rank_for, train_accelerator
from moe_offload.options import OffloadConfig

# three layers (a chain of two steps), GQA with two kv groups, a window shorter than the sequences
PEEK_CFG = dataclasses.replace(CFG, num_hidden_layers=3, sliding_window=5, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return moe_offload.load(write_model(tmp_path_factory.mktemp("m"), PEEK_CFG), device="cpu", offload=False)


def residuals(m, ids, batch=1):
    """Run ids [batch, T] through a KVCache; return (the residual entering each layer's MoE [batch, T, L, H],
    the filled cache)."""
    cfg = m.model.cfg
    mids = torch.zeros(batch, len(ids[0]), cfg.num_hidden_layers, cfg.hidden_size)

    class Mid(Observer):
        def on_residual(self, layer, x, start_pos):
            mids[:, :, layer] = x.view(batch, -1, cfg.hidden_size)

    cache = KVCache(cfg, batch, 32, m.model.dtype, m.model.device)
    with observing(m.model, Mid()), torch.inference_mode():
        m.model(torch.tensor(ids), 0, cache)
    return mids, cache


def layer_input(m, mid, layer):
    """The true residual entering layer+1: mid + layer's MoE output."""
    w = m.model.layers[layer]
    return mid + m.model.moe_block(rms_norm(mid, w.post_attention_layernorm, m.model.cfg.rms_norm_eps), layer)


def test_peek_on_the_true_input_is_the_layers_attention_in_every_cache_mode(model):
    m, T = model, 12
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, PEEK_CFG.vocab_size, (2, T), generator=g).tolist()
    mids, cache = residuals(m, ids, batch=2)
    before = (cache.k.clone(), cache.v.clone())
    x = layer_input(m, mids[:, :, 0], 0)  # [2, T, H]: the true input of layer 1
    want = mids[:, :, 1]
    with torch.inference_mode():
        # training's view: the cache holds the whole window, each row its own key
        torch.testing.assert_close(x + peek_attention(m.model, 1, x, 0, cache, real_until=T), want)
        # runtime prefill: real keys before position 7, the chunk's own estimated (here true) keys after
        torch.testing.assert_close(x[:, 7:] + peek_attention(m.model, 1, x[:, 7:], 7, cache), want[:, 7:])
        # no cache: the chunk alone
        torch.testing.assert_close(x + peek_attention(m.model, 1, x, 0, None), want)
        # batched decode: rows at their own positions
        pos = torch.tensor([4, 9])
        rows = x[torch.arange(2), pos][:, None]  # [2, 1, H]
        got = rows + peek_attention(m.model, 1, rows, RowPositions(pos, torch.arange(2), 10), cache)
        torch.testing.assert_close(got[:, 0], want[torch.arange(2), pos])
        with pytest.raises(ValueError, match="real_until 3 is before"):
            peek_attention(m.model, 1, x[:, 7:], 7, cache, real_until=3)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])  # nothing written


def test_peek_reads_the_earlier_positions_keys(model):
    # A wrong estimate at the row itself does not hide the real earlier keys: changing them changes it.
    m, T = model, 10
    mids, cache = residuals(m, [list(range(3, 3 + T))])
    x = mids[:, -1:, 0]  # [1, 1, H]
    with torch.inference_mode():
        a = peek_attention(m.model, 1, x, T - 1, cache)
        cache.v[1, :, :, T - 3] += 1.0  # a key inside the window of 5
        b = peek_attention(m.model, 1, x, T - 1, cache)
        cache.v[1, :, :, 0] += 1.0  # outside the sliding window: unseen
        c = peek_attention(m.model, 1, x, T - 1, cache)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)


def test_chain_with_exact_stand_ins_reproduces_the_later_layers(model):
    # With stand-ins equal to the real experts the chain is the model itself: s_j == the residual
    # entering layer l+j's MoE. Stand-ins of rank 0 are replaced by the real experts via monkeypatch.
    m, T = model, 9
    ids = [list(range(5, 5 + T))]
    mids, cache = residuals(m, ids)
    acc = Accelerator(PEEK_CFG.hidden_size, 3, [1, 2], rank=4, peek=True, expert_rank=2,
                      num_experts=PEEK_CFG.num_local_experts)
    acc.stand_in = lambda model_, layer, s, route_on=None: layer_input(m, s, layer) - s
    with torch.inference_mode():
        s1, s2 = acc.chain(m.model, 0, mids[0, :, 0], 2, 0, cache, real_until=T)
    torch.testing.assert_close(s1, mids[0, :, 1])
    torch.testing.assert_close(s2, mids[0, :, 2])


def test_stand_ins_decode_path_equals_the_dense_path_and_cross_rows_do_not_peek(model):
    m = model
    acc = Accelerator(PEEK_CFG.hidden_size, 3, [1, 2], rank=4, peek=True, expert_rank=3,
                      num_experts=PEEK_CFG.num_local_experts, cross_token=True)
    x = torch.randn(4, PEEK_CFG.hidden_size)
    assert torch.equal(acc.stand_in(m.model, 0, x), torch.zeros_like(x))  # V starts at zero
    with torch.no_grad():
        for p in acc.V.values():
            p.normal_()
    dense = acc.stand_in(m.model, 0, x)  # 4 rows x top-2 >= 4 experts: every expert, masked
    one = torch.cat([acc.stand_in(m.model, 0, x[i:i + 1]) for i in range(4)])  # gathered top-k
    torch.testing.assert_close(one, dense)
    assert acc.peeks(0, 2) and not acc.peeks(1, 2) and not acc.peeks(2, 1)
    # a row landing in the next token scores as the same adapter without peek does
    plain = Accelerator(PEEK_CFG.hidden_size, 3, [1, 2], rank=4, cross_token=True)
    plain.load_state_dict({k: v for k, v in acc.state_dict().items() if k[0] in "AB"})
    mids, cache = residuals(m, [list(range(3, 9))])
    with torch.inference_mode():
        a = M2R2Predictor(m.model, acc, 2).scores(2, mids[0, :, 2], history=(cache, 0, 6))
        b = M2R2Predictor(m.model, plain, 2).scores(2, mids[0, :, 2])
    torch.testing.assert_close(a, b)
    with pytest.raises(MoeOffloadError, match="needs peek"):
        Accelerator(PEEK_CFG.hidden_size, 3, [1], rank=4, expert_rank=3, num_experts=4)


def trained(m, ids, **kw):
    acc, _ = train_accelerator(m.model, ids, lookaheads=[1, 2], rank=4, epochs=1, lr=1e-2, window=16,
                               show_progress=False, peek=True, **kw)
    return acc


def test_decode_predictions_equal_the_trace_and_training_view(model, tmp_path):
    # The runtime scores a decode step with the real keys of every earlier position (the forward's
    # cache); the trace scores prefill chunks after their forward, and training reads a filled window:
    # all three must be the same numbers for the same position.
    m = model
    g = torch.Generator().manual_seed(2)
    text = torch.randint(3, PEEK_CFG.vocab_size, (400,), generator=g).tolist()
    acc = trained(m, text)
    f = tmp_path / "peek.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model)})
    seq = text[:20]
    pred = M2R2Predictor(m.model, Accelerator.load(f, m.model)[0], 2)
    live = torch.zeros(len(seq), 3, 2, PEEK_CFG.num_local_experts)

    class Live(Observer):
        def on_residual(self, layer, x, start_pos):
            pred.observe(layer, x, start_pos)
            live[start_pos, layer] = pred.scores(layer, x, start_pos)[0]

    cache = KVCache(m.model.cfg, 1, 32, m.model.dtype, m.model.device)
    with observing(m.model, Live()), torch.inference_mode():
        for p, t in enumerate(seq):  # decode, one token at a time
            m.model(torch.tensor([[t]]), p, cache)
    xs, wcache = collect_window(m.model, seq)
    fresh = M2R2Predictor(m.model, Accelerator.load(f, m.model)[0], 2)
    for layer in range(2):
        window = fresh.scores(layer, xs[:, layer], history=(wcache, 0, len(seq)))
        torch.testing.assert_close(live[:, layer], window, equal_nan=True)
    trace = record_with_predictions(m.model, seq, 32, 2, f)  # prefill chunks, scored after their forward
    torch.testing.assert_close(torch.from_numpy(trace.preds["m2r2"][:, :2]), live[:, :2], equal_nan=True)


def test_peek_training_beats_the_plain_adapter_and_round_trips(tmp_path):
    # Bundled model, small budget: the peek chain with stand-ins must beat the plain (v2) adapter
    # trained on the same windows at every lookahead; the file round-trips exactly.
    from moe_offload.runtime import bundled_heldout_text

    m = moe_offload.load(device="cpu", offload=False)
    ids = m.encode_text(bundled_heldout_text().read_text(encoding="utf-8"))[:5000]
    kw = dict(lookaheads=[1, 2, 3], rank=16, epochs=1, lr=3e-3, window=128, show_progress=False)
    acc, peek = train_accelerator(m.model, ids, peek=True, **kw)
    _, plain = train_accelerator(m.model, ids, **kw)
    for d in ("d1", "d2", "d3"):
        got, base = peek["heldout_after"]["recall"]["m2r2"][d]["top_k"], plain["heldout_after"]["recall"]["m2r2"][d]["top_k"]
        assert got > base + 0.01, (d, got, base)
    f = tmp_path / "p.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model)})
    loaded, meta = Accelerator.load(f, m.model)
    assert meta["attention_peek"] is True and meta["expert_rank"] == expert_rank_for(8) == loaded.expert_rank
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:  # a reader without the chain finds no "B.*" and fails loudly
        names = list(fh.keys())
    assert any(n.startswith("Bpeek.") for n in names) and not any(n.startswith("B.") for n in names)
    xs, cache = collect_window(m.model, ids[:40])
    a = M2R2Predictor(m.model, loaded, 3).scores(1, xs[:, 1], history=(cache, 0, 40))
    b = M2R2Predictor(m.model, acc, 3).scores(1, xs[:, 1], history=(cache, 0, 40))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offloaded_decoding_with_a_peek_adapter_is_exact(model, tmp_path, monkeypatch):
    m = model
    g = torch.Generator().manual_seed(3)
    acc = trained(m, torch.randint(3, PEEK_CFG.vocab_size, (300,), generator=g).tolist())
    f = tmp_path / "peek.safetensors"
    acc.save(f, {"fingerprint": model_fingerprint(m.model)})
    path = m.path
    prompt = [1, 7, 3, 9, 11, 4]
    want = m.generate(prompt, max_new_tokens=12).token_ids
    for policy in ("lru-layer", "predictive"):
        off = moe_offload.load(path, device="cpu", cache_per_layer=2, predictor="m2r2",
                               config=OffloadConfig.make(policy=policy, lookahead=2, accelerator=f))
        off.prefetcher.max_inflight = 2
        peeks = []
        monkeypatch.setattr(accelerator_module, "peek_attention",  # the chain's peek: (model, layer, x, start, cache, ..)
                            lambda *a, **kw: peeks.append(a[4] is not None) or peek_attention(*a, **kw))
        res = off.generate(prompt, max_new_tokens=12)
        assert res.token_ids == want, policy
        assert res.stats["prefetch_issued"] > 0, res.stats
        assert peeks and all(peeks), "decode predictions must peek through the forward's KV cache"
