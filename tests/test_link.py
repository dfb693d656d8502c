"""The demand-first chunked link (offload.link): hand-computed virtual-time timelines on the simulator's
engine (which runs the runtime's scheduler), the thread engine's ordering in real time, and exact outputs
with chunked copies, random delays and failed prefetches."""

import threading

import pytest
import torch

import moe_offload
from helpers import CFG, decode_with_failing_prefetches, write_model
from moe_offload.analysis.sim import SimCopyEngine, VirtualClock
from moe_offload.offload import CopyFaults, ThreadCopyEngine
from moe_offload.offload.link import LinkScheduler

EMPTY = torch.empty(0)


def sim(chunk_bytes):
    """One expert = 4 bytes = 1 s of link time; chunks of `chunk_bytes`."""
    clock = VirtualClock()
    return clock, SimCopyEngine(clock, copy_seconds=1.0, expert_bytes=4, chunk_bytes=chunk_bytes)


def prefetch(engine, e, priority):
    return engine.load((0, e), EMPTY, EMPTY, e, prefetch=True, priority=priority)


def test_demand_waits_at_most_one_chunk_behind_queued_prefetches():
    clock, eng = sim(chunk_bytes=1)  # 0.25 s chunks
    p1, p2, p3 = prefetch(eng, 1, 3.0), prefetch(eng, 2, 2.0), prefetch(eng, 3, 1.0)
    clock.now = 1.6  # p1 landed at 1.0; p2's third chunk (1.5 .. 1.75) is on the link
    assert p1.done() and not p2.done()
    d = eng.load((1, 0), EMPTY, EMPTY, 0)
    stall = eng.wait(d)
    assert d.t_done == pytest.approx(2.75) and stall == pytest.approx(1.15)  # 0.15 of chunk + 1.0 copy
    assert clock.now == pytest.approx(2.75)
    clock.now = 10.0
    eng.advance(clock.now)
    assert p2.t_done == pytest.approx(3.0) and p3.t_done == pytest.approx(4.0)  # resumed after the demand
    assert eng.busy_seconds == pytest.approx(4.0)


def test_fifo_link_makes_the_demand_wait_for_the_whole_queue():
    clock, eng = sim(chunk_bytes=4)  # one chunk per expert: the old FIFO link
    for e, prio in ((1, 3.0), (2, 2.0), (3, 1.0)):
        prefetch(eng, e, prio)
    clock.now = 1.6
    d = eng.load((1, 0), EMPTY, EMPTY, 0)
    eng.wait(d)
    assert d.t_done == pytest.approx(3.0)  # behind the whole of p2 (the chunk on the link) only ...
    clock2, eng2 = sim(chunk_bytes=4)
    for e in (1, 2, 3):
        eng2.load((0, e), EMPTY, EMPTY, e)  # ... but demand loads queue FIFO among themselves
    clock2.now = 1.6
    d2 = eng2.load((1, 0), EMPTY, EMPTY, 0)
    eng2.wait(d2)
    assert d2.t_done == pytest.approx(4.0)


def test_prefetches_go_by_expected_value_and_a_waiter_promotes_one():
    clock, eng = sim(chunk_bytes=4)
    low, mid, high = prefetch(eng, 1, 0.1), prefetch(eng, 2, 0.5), prefetch(eng, 3, 1.0)
    # low went on the idle link at t=0 (it was alone); then high, then mid.
    clock.now = 10.0
    eng.advance(clock.now)
    assert (low.t_done, high.t_done, mid.t_done) == pytest.approx((1.0, 2.0, 3.0))
    clock, eng = sim(chunk_bytes=4)
    first, a, b = prefetch(eng, 1, 9.0), prefetch(eng, 2, 1.0), prefetch(eng, 3, 0.1)
    assert eng.wait(b) == pytest.approx(2.0)  # promoted: after the chunk on the link, before a
    clock.now = 10.0
    eng.advance(clock.now)
    assert (first.t_done, b.t_done, a.t_done) == pytest.approx((1.0, 2.0, 3.0))


def test_cancel_only_what_is_not_on_the_link():
    clock, eng = sim(chunk_bytes=1)
    p1, p2 = prefetch(eng, 1, 2.0), prefetch(eng, 2, 1.0)
    clock.now = 0.3  # p1's second chunk is on the link
    assert eng.cancel(p1) is None
    assert eng.cancel(p2) == 4  # nothing of it was sent
    clock.now = 5.0
    eng.advance(clock.now)
    assert p1.t_done == pytest.approx(1.0) and p2.t_done is None and eng.busy_seconds == pytest.approx(1.0)


def test_scheduler_validates_and_splits():
    with pytest.raises(moe_offload.MoeOffloadError, match="chunk_bytes must be an integer >= 1, got 0"):
        LinkScheduler(0)
    s = LinkScheduler(3)
    s.submit("h", 7, demand=True)
    sizes = []
    while (item := s.next_chunk()) is not None:
        sizes.append((item[1], item[2]))
        s.chunk_done(item[0])
    assert sizes == [(0, 3), (3, 3), (6, 1)] and len(s) == 0


def test_thread_engine_demand_overtakes_queued_prefetches():
    started, lock = [], threading.Lock()

    def delay(key):
        with lock:
            started.append(key)
        return 0.03

    eng = ThreadCopyEngine(CopyFaults(delay=delay), chunk_bytes=64)
    src = [torch.full((256,), float(i)) for i in range(6)]
    dst = [torch.zeros(256) for _ in range(6)]
    handles = [eng.load((0, i), src[i], dst[i], i, prefetch=True, priority=10.0 - i) for i in range(5)]
    d = eng.load((1, 0), src[5], dst[5], 5)
    eng.wait(d)
    for h in handles:
        eng.wait(h)
    eng.close()
    assert started.index((1, 0)) <= 1  # at most the first prefetch went before it
    assert [k for k in started if k[0] == 0] == [(0, i) for i in range(5)]  # by value
    assert all(torch.equal(a, b) for a, b in zip(src, dst))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m"))


def test_chunked_copies_with_delays_and_failed_prefetches_keep_outputs_exact(model_path):
    decode_with_failing_prefetches(model_path, lambda fail, rng: ThreadCopyEngine(
        CopyFaults(delay=lambda key: rng.uniform(0, 0.002), fail=fail), chunk_bytes=128))


def test_bytes_before_landing_in_virtual_time():
    # One expert = 4 bytes = 1 s; chunks of 1 byte. At 0.25 s the first chunk has landed and the second
    # is on the link until 0.5 s: 1 byte of link time on it plus 2 unsent bytes. An older demand load
    # goes first when the prefetch is waited for; a newer one does not (demands keep their age order).
    clock, eng = sim(1)
    old_demand = eng.load((1, 0), EMPTY, EMPTY, 9)
    h = prefetch(eng, 0, 1.0)
    clock.now = 1.25
    assert eng.bytes_before_landing(h) == 3
    assert eng.bytes_before_landing(old_demand) is None  # landed at 1.0
    clock, eng = sim(1)
    h = prefetch(eng, 0, 1.0)
    clock.now = 0.25
    eng.load((1, 0), EMPTY, EMPTY, 9)  # a demand, newer than the prefetch
    assert eng.bytes_before_landing(h) == 3
    clock.now = 5.0
    assert eng.bytes_before_landing(h) is None
