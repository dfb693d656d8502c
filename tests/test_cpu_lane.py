"""The CPU lane (hybrid): the decision rule on hand-made costs, and hybrid runs (device=cpu, the thread
copy engine with injected copy delays; the CPU lane computes from the host store) against the
all-device run."""

import random

import numpy as np
import pytest
import torch

import moe_offload
from moe_offload.offload import ThreadCopyEngine
from helpers import decode_logits, write_model
from moe_offload import MoeOffloadError
from moe_offload.offload import CopyFaults
from moe_offload.offload.cpu_lane import CpuLane, LaneCosts, build_cpu_lane, split_misses
from moe_offload.options import OffloadConfig

COSTS = LaneCosts(copy_seconds=1.0, chunk_seconds=0.25, weight_seconds=0.5, token_seconds=0.1)


def test_decision_rule_on_hand_made_costs():
    ones = {0: 1, 3: 1, 5: 1}
    # link: 1.25, 2.25, 3.25 for the 1st/2nd/3rd copy; cpu: 0.6, 1.2, 1.8 cumulated.
    # 0: cpu 0.6 < 1.25; 3: cpu 1.2 < 1.25; 5: cpu 1.8 > link 1.25 -> copied.
    assert split_misses([0, 3, 5], ones, COSTS) == [0, 3]
    assert split_misses([0, 3, 5], ones, COSTS, link_backlog=1.0) == [0, 3, 5]  # 1.8 < 2.25
    assert split_misses([0], {0: 8}, COSTS) == []  # 0.5 + 0.8 = 1.3 > 1.25: eight tokens are worth a copy
    assert split_misses([0], {0: 7}, COSTS) == [0]  # 1.2 < 1.25
    slow_cpu = LaneCosts(copy_seconds=1.0, chunk_seconds=0.0, weight_seconds=1.0, token_seconds=0.0)
    # 1: a tie (1.0 each) goes to the link; 2: then the link would land it at 2.0, the idle CPU at 1.0.
    assert split_misses([1, 2], {1: 1, 2: 1}, slow_cpu) == [2]
    dev = LaneCosts(copy_seconds=1.0, chunk_seconds=0.0, weight_seconds=1.1, token_seconds=0.0, device_seconds=0.2)
    assert split_misses([1], {1: 1}, dev) == [1]  # 1.1 < 1.0 + 0.2 of device compute after the copy
    # an expert whose copy is in flight: the CPU takes it only if it finishes before the copy lands, and
    # waiting for it does not delay the copies after it
    assert split_misses([2, 4], {2: 1, 4: 1}, COSTS, landing={2: 0.4}) == [4]  # 0.6 > 0.4; 4: 0.6 < 1.25
    assert split_misses([2, 4], {2: 1, 4: 1}, COSTS, landing={2: 3.0}) == [2, 4]  # 0.6 < 3.0; 1.2 < 1.25
    with pytest.raises(MoeOffloadError, match="cpu lane cost copy_seconds must be a finite number >= 0"):
        LaneCosts(copy_seconds=-1.0, chunk_seconds=0, weight_seconds=0, token_seconds=0)


PROMPT = [1, 7, 3, 9, 11, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("m"))
    ref = moe_offload.load(path, device="cpu", offload=False)
    return path, ref, ref.generate(PROMPT, max_new_tokens=12).token_ids




def hybrid(path, costs, **kw):
    m = moe_offload.load(path, config=OffloadConfig.make(device="cpu", cache_experts=3, cpu_experts="off", **kw))
    c = m.expert_cache
    rng = random.Random(0)
    c.engine.faults = CopyFaults(delay=lambda key: rng.uniform(0, 0.002))  # a slow link
    m.model.experts.cpu_lane = CpuLane(c.store, costs)
    return m


CPU_WINS = LaneCosts(copy_seconds=1.0, chunk_seconds=0.0, weight_seconds=0.1, token_seconds=0.01)
CPU_LOSES = LaneCosts(copy_seconds=1e-6, chunk_seconds=0.0, weight_seconds=1.0, token_seconds=0.01)


@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_hybrid_equals_the_all_device_run_within_fp32_rounding(setup, predictor):
    path, ref, expected = setup
    ref_decode = decode_logits(ref, PROMPT)
    m = hybrid(path, CPU_WINS, predictor=predictor, lookahead=None if predictor == "none" else 1)
    got = decode_logits(m, PROMPT)
    st = m.cache_stats()
    assert st["cpu_experts"] > 0 and st["hits"] + st["misses"] == st["uses"]
    # fp32: only the order of the expert sums differs (a few ulp of logits of size ~1).
    torch.testing.assert_close(got, ref_decode, rtol=1e-5, atol=1e-5)
    res = m.generate(PROMPT, max_new_tokens=12)
    assert res.token_ids == expected and res.stats["cpu_experts"] > 0
    m.expert_cache.stats.check()


def test_hybrid_counts_and_leaves_no_pins(setup):
    path, _, _ = setup
    m = hybrid(path, CPU_WINS, predictor="none")
    m.generate(PROMPT, max_new_tokens=4)
    c = m.expert_cache
    # Prefill (6 tokens <= max_tokens 8) and decode: every miss went to the CPU (a fill still in flight
    # too: the CPU wins against it); each was then copied in the background (a fill), so once the fills
    # have landed, uses of them hit the cache.
    assert c.stats.cpu_experts.sum() == c.stats.misses.sum() > 0
    assert c.stats.prefetch_hits.sum() == 0  # the fills are not prefetches
    c.engine.drain()
    m.generate(PROMPT, max_new_tokens=4)
    assert c.stats.cpu_experts.sum() == c.stats.misses.sum() and c.stats.hits.sum() > 0
    assert c.stats.bytes_h2d.sum() > 0 and not c.pinned
    c.stats.check()


def test_cpu_that_loses_leaves_the_run_bit_identical(setup):
    path, ref, expected = setup
    m = hybrid(path, CPU_LOSES)
    assert torch.equal(decode_logits(m, PROMPT), decode_logits(ref, PROMPT))
    assert m.cache_stats()["cpu_experts"] == 0


def test_lane_is_skipped_for_many_tokens(setup):
    path, ref, _ = setup
    m = hybrid(path, CPU_WINS)
    m.model.experts.cpu_lane.max_tokens = 4
    prompt = PROMPT + [5, 13, 6, 21]
    assert torch.equal(m.logits(prompt), ref.logits(prompt))  # 10 tokens: all copies, exact
    assert m.cache_stats()["cpu_experts"] == 0


def test_cpu_experts_option(setup):
    path, _, _ = setup
    with pytest.raises(MoeOffloadError, match="cpu_experts must be one of \\['auto', 'off'\\], got 'always'"):
        moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=3, cpu_experts="always"))
    assert moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=3)).model.experts.cpu_lane is None  # off on cpu
    m = moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=3, cpu_experts="auto"))
    costs = m.model.experts.cpu_lane.costs
    assert costs.copy_seconds > 0 and costs.weight_seconds > 0
    # a demand copy waits behind the engine's bound: one chunk of the thread engine's link (8 MiB here,
    # more than this model's experts: a whole one), less with smaller chunks, a whole expert on a FIFO link
    assert costs.chunk_seconds == costs.copy_seconds
    m.expert_cache.engine.close()
    m.expert_cache.engine = ThreadCopyEngine(chunk_bytes=m.expert_cache.store.expert_bytes // 4)
    lane = build_cpu_lane(m.expert_cache, "auto")
    assert lane.costs.chunk_seconds == pytest.approx(lane.costs.copy_seconds / 4, rel=0.01)
    assert np.isfinite(lane.costs.token_seconds)
    for mb in (-1, 0, float("nan"), 1e-9, 1e-6, "8"):
        with pytest.raises(MoeOffloadError, match="link_chunk_mb"):
            moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=3, link_chunk_mb=mb))


def test_hybrid_with_the_triton_kernels(setup):
    # Kernel backends get the CPU experts' assignments redirected to a device expert at weight 0.
    path, _, _ = setup
    ref = moe_offload.load(path, device="cpu", offload=False, config=OffloadConfig.make(moe_backend="triton"))
    m = moe_offload.load(path, device="cpu", predictor="none", config=OffloadConfig.make(cache_experts=3, cpu_experts="off", moe_backend="triton"))
    m.model.experts.cpu_lane = CpuLane(m.expert_cache.store, CPU_WINS)
    got, want = decode_logits(m, PROMPT), decode_logits(ref, PROMPT)
    assert m.cache_stats()["cpu_experts"] > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hybrid_computes_experts_whose_prefetch_is_still_in_flight(setup):
    # A slow link (every copy 20 ms) and a wide prefetch window: needed experts are often still in
    # flight. The lane computes them (the copies land anyway) and the run stays exact.
    path, ref, expected = setup
    m = moe_offload.load(path, device="cpu", predictor="next-gate",
                         config=OffloadConfig.make(cache_experts=5, cpu_experts="off", lookahead=1, prefetch_margin=1))
    m.prefetcher.max_inflight = 4  # a wide window: many prefetches still in flight when needed
    c = m.expert_cache
    c.engine.faults = CopyFaults(delay=lambda key: 0.02)
    lane = m.model.experts.cpu_lane = CpuLane(c.store, LaneCosts(copy_seconds=0.02, chunk_seconds=0.0,
                                                                 weight_seconds=1e-4, token_seconds=0.0))
    taken_in_flight = []
    pick = lane.pick

    def spy(misses, ids_host, link_backlog=0.0, landing=None):
        chosen = pick(misses, ids_host, link_backlog, landing)
        taken_in_flight.extend(e for e in chosen if e in (landing or {}))
        return chosen
    lane.pick = spy
    got = decode_logits(m, PROMPT)
    res = m.generate(PROMPT, max_new_tokens=12)
    torch.testing.assert_close(got, decode_logits(ref, PROMPT), rtol=1e-5, atol=1e-5)
    assert res.token_ids == expected
    assert taken_in_flight  # the CPU computed experts whose copy had not landed
    c.stats.check()
    assert not c.pinned


def test_auto_prefetch_with_the_lane_and_lru_layer():
    # lru-layer + lane + within-token adapters: auto turns prefetch off and says why; a prefetch option the
    # user gave keeps it on; under lru it stays on (benchmarks/results/hybrid_prefetch*.json)
    kw = dict(device="cpu", cache_per_layer=4, cpu_experts="auto")
    off = moe_offload.load(config=OffloadConfig.make(policy="lru-layer", **kw)).model.experts
    assert off.prefetcher is None and "lru-layer" in off.prefetch_note
    assert moe_offload.load(config=OffloadConfig.make(policy="lru-layer", prefetch_margin=1, **kw)).model.experts.prefetcher.margin == 1
    assert moe_offload.load(config=OffloadConfig.make(policy="lru-layer", lookahead=1, **kw)).model.experts.prefetcher is not None
    assert moe_offload.load(config=OffloadConfig.make(**kw)).model.experts.prefetcher is not None


def test_cli_summary_says_what_prefetch_runs(capsys):
    # The CLI passes unset prefetch options as None, so auto's choice is the API's; the summary line says it.
    from moe_offload.cli import main

    base = ["generate", "--cache-per-layer", "4", "--max-new-tokens", "2", "--cpu-experts", "auto"]
    assert main(base + ["--tuning", "policy=lru-layer"]) == 0
    assert "prefetch none (auto: off with the CPU lane, lru-layer" in capsys.readouterr().err
    assert main(base + ["--tuning", "policy=lru-layer", "--tuning", "lookahead=2"]) == 0
    assert "prefetch m2r2 (lookahead 2, margin 0)" in capsys.readouterr().err
    assert main(base) == 0
    assert "lru, prefetch m2r2 (lookahead 2, margin 0)" in capsys.readouterr().err
