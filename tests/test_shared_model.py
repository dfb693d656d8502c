"""One model object used from several places: threads, interleaved streams, calls between stream steps,
re-entrant calls from a callback. Reference: the same generation run alone on a fresh model."""

from __future__ import annotations

import threading

import pytest
import torch

import moe_offload as mo
from moe_offload.errors import MoeOffloadError

from moe_offload.checkpoint import expected_tensors, save_checkpoint

from helpers import CFG
from moe_offload.options import OffloadConfig

PROMPTS = [[1, 5, 9, 3], [1, 7, 7, 2, 11, 4], [1, 30, 12]]
N = 12


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """A random model with weights large enough that tokens depend on the whole context."""
    g = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(s, generator=g) * 0.6 for n, s in expected_tensors(CFG).items()}
    out = tmp_path_factory.mktemp("shared")
    save_checkpoint(out, CFG, tensors)
    return out


@pytest.fixture(scope="module")
def model(path):
    m = mo.load(path, predictor="next-gate", config=OffloadConfig.make(cache_experts=3))  # a small cache: evictions every layer
    m.tokenizer = _FakeTok()  # one text delta per token, so streams and callbacks step token by token
    yield m
    m.close()


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy tokens, run one call at a time (the reference)."""
    return [model.generate(p, max_new_tokens=N).token_ids for p in PROMPTS]


def _tokens(stream):
    for _ in stream:
        pass
    return stream.result.token_ids


def test_two_threads_generate_exact(model, alone):
    out: dict[int, list[list[int]]] = {0: [], 1: []}
    errors = []

    def work(i):
        try:
            for _ in range(3):
                out[i].append(model.generate(PROMPTS[i], max_new_tokens=N).token_ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert out[0] == [alone[0]] * 3 and out[1] == [alone[1]] * 3


def test_two_streams_alternately_exact(model, alone):
    a = model.generate(PROMPTS[0], max_new_tokens=N, stream=True)
    b = model.generate(PROMPTS[1], max_new_tokens=N, stream=True)
    live = [a, b]
    while live:
        for s in list(live):
            if next(s, None) is None:
                live.remove(s)
    assert a.result.token_ids == alone[0] and b.result.token_ids == alone[1]


def test_calls_between_stream_steps_exact(model, alone):
    s = model.generate(PROMPTS[0], max_new_tokens=N, stream=True)
    next(s)
    model.logits(PROMPTS[2])
    next(s)
    assert model.generate(PROMPTS[1], max_new_tokens=N).token_ids == alone[1]
    assert _tokens(s) == alone[0]


def test_stream_in_other_thread_between_steps(model, alone):
    s = model.generate(PROMPTS[2], max_new_tokens=N, stream=True)
    next(s)
    t = threading.Thread(target=lambda: model.generate(PROMPTS[0], max_new_tokens=N))
    t.start()
    t.join()
    assert _tokens(s) == alone[2]


@pytest.mark.parametrize("call", ["generate", "logits", "stream"])
def test_reentrant_call_from_callback_refused(model, alone, call):
    def cb(_delta):
        if call == "generate":
            model.generate(PROMPTS[1], max_new_tokens=2)
        elif call == "logits":
            model.logits(PROMPTS[1])
        else:
            next(model.generate(PROMPTS[1], max_new_tokens=2, stream=True))

    with pytest.raises(MoeOffloadError, match="re-entrant"):
        model.generate(PROMPTS[0], max_new_tokens=3, callback=cb)
    assert model.generate(PROMPTS[0], max_new_tokens=N).token_ids == alone[0]  # still usable and exact


class _FakeTok:
    """Token ids -> one letter each (the test model has no tokenizer.json)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stale_stream_would_be_wrong_without_resync(model, alone, monkeypatch):
    """The guard is what keeps a resumed stream exact: with staleness ignored the tokens differ."""
    import moe_offload.generate as g

    orig = g.decode_tokens
    monkeypatch.setattr("moe_offload.runtime.decode_tokens",
                        lambda *a, is_stale=None, **k: orig(*a, **k))
    s = model.generate(PROMPTS[0], max_new_tokens=N, stream=True)
    next(s)
    model.logits(PROMPTS[1] + PROMPTS[2] * 3)  # overwrite the stream's KV rows
    assert _tokens(s) != alone[0]
