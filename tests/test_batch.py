"""Batched decoding: each sequence's greedy output equals its solo run, whatever else is in the batch."""

import moe_offload
from helpers import write_model
from moe_offload.options import OffloadConfig

PROMPTS = ["In the beginning", "And God said, Let there be light", "Jesus wept.", "The LORD is my shepherd"]


def test_batched_greedy_equals_solo_runs_bundled():
    m = moe_offload.load(device="cpu")
    solo = [m.generate(p, max_new_tokens=12).token_ids for p in PROMPTS]
    batched = m.generate(PROMPTS, max_new_tokens=12, max_batch=4)
    assert [r.token_ids for r in batched] == solo
    two = m.generate(PROMPTS, max_new_tokens=12, max_batch=2)  # requests join as others leave
    assert [r.token_ids for r in two] == solo


def test_batched_greedy_equals_solo_offloaded(tmp_path):
    path = write_model(tmp_path)
    prompts = [[1, 7, 3], [1, 9], [1, 4, 4, 8, 2, 6], [1]]
    m = moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=3))
    solo = [m.generate(p, max_new_tokens=8).token_ids for p in prompts]
    assert [r.token_ids for r in m.generate(prompts, max_new_tokens=8, max_batch=3)] == solo
