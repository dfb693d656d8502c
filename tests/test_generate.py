"""Sampling, streaming and stop rules."""

import torch

import moe_offload
from helpers import CFG, write_model
from moe_offload.generate import SamplingParams, sample_next
from moe_offload.options import OffloadConfig


def test_greedy_is_argmax_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits, SamplingParams(temperature=0.0), None) == 1
    # top_p small enough that only the most likely token survives: always token 1.
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.3), g) for _ in range(50)} == {1}
    # top_p covering the two best tokens never yields the other two.
    seen = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g) for _ in range(200)}
    assert seen == {1, 3}


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu")
    a = m.generate([1, 2, 3], max_new_tokens=12, temperature=1.5, seed=7)
    b = m.generate([1, 2, 3], max_new_tokens=12, temperature=1.5, seed=7)
    c = m.generate([1, 2, 3], max_new_tokens=12, temperature=1.5, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stops_on_eos_length_and_context(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu", config=OffloadConfig.make(max_seq_len=10))
    greedy = m.generate([1, 4], max_new_tokens=5)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 5
    assert greedy.stats["prefill_tokens"] == 2 and greedy.stats["decode_tokens"] == 4
    # The context holds 10 positions: a 4-token prompt leaves room for 6 more fed back, 7 sampled.
    object.__setattr__(m.config, "eos_token_ids", ())  # no EOS can end it early
    full = m.generate([1, 4, 5, 6], max_new_tokens=50, temperature=1.0, seed=0)
    assert full.finish_reason == "context" and len(full.token_ids) == 7
    # Make the first greedy token an EOS: generation stops right there and includes it.
    first = greedy.token_ids[0]
    object.__setattr__(m.config, "eos_token_ids", (first,))
    res = m.generate([1, 4], max_new_tokens=5)
    assert res.token_ids == [first] and res.finish_reason == "eos"


def test_expert_use_counts_every_token_and_layer(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu")
    res = m.generate([1, 2, 3, 4], max_new_tokens=6)
    # Every token that went through the model (4 prompt + 5 fed back) used top_k experts per layer.
    uses = res.stats["expert_uses"]  # [L][E] routed assignments
    assert [sum(row) for row in uses] == [9 * CFG.num_experts_per_tok] * CFG.num_hidden_layers


def test_streaming_yields_the_same_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    path = write_model(tmp_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["héllo wörld ✓ " * 20], trainers.BpeTrainer(
        vocab_size=CFG.vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40]))
    tok.save(str(path / "tokenizer.json"))
    m = moe_offload.load(path, device="cpu")
    whole = m.generate("héllo", max_new_tokens=10, temperature=1.0, seed=3)
    seen = []
    stream = m.generate("héllo", max_new_tokens=10, temperature=1.0, seed=3, stream=True,
                        callback=seen.append)
    chunks = list(stream)
    assert "".join(chunks) == whole.text == stream.result.text == "".join(seen)
    assert stream.result.token_ids == whole.token_ids
    assert whole.prompt_token_ids[0] == CFG.bos_token_id


def test_streamer_holds_back_an_incomplete_character():
    from moe_offload.generate import TextStreamer

    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}  # "café!" with the é split over two tokens
    s = TextStreamer(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"))
    assert [s.push(1), s.push(2), s.push(3), s.finish()] == ["caf", "", "\u00e9!", ""]
