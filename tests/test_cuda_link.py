"""CudaLinkEngine (offload.cuda_link), the demand-first chunked link on a CUDA copy stream, run here on a
fake device: each stream is a thread running its operations in order, events are set when the stream
reaches them, and a stream waiting on an event blocks until it is set (CUDA's semantics for events that
are recorded once, which is how the engine uses them). The GPU run (benchmarks/gpu_check.py) checks the
same engine on real streams."""

import queue
import threading
import time

import pytest
import torch

from helpers import decode_with_failing_prefetches, write_model
from moe_offload.offload import CopyFaults
from moe_offload.offload.cuda_link import CudaLinkEngine
from moe_offload.offload.transfer import CopyFailed


class FakeEvent:
    def __init__(self):
        self._set = threading.Event()
        self._set.set()  # never recorded: complete, as in CUDA
        self.t = 0.0

    def query(self):
        return self._set.is_set()


class FakeStream:
    """A stream: a thread running its operations in order. `sync=True`: the host's own thread (work
    runs at once), a device that never lags the host."""

    def __init__(self, sync=False):
        self.sync = sync
        if not sync:
            self.q = queue.Queue()
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            fn = self.q.get()
            try:
                fn()
            except BaseException as exc:  # a fake-device fault: make it loud, as a CUDA error would be
                import sys
                import traceback

                traceback.print_exc(file=sys.__stderr__)
                self.error = exc

    def put(self, fn):
        fn() if self.sync else self.q.put(fn)


class FakeOps:
    def __init__(self, copy_seconds=0.0, sync_compute=True):
        self.copy_stream, self.compute = FakeStream(), FakeStream(sync=sync_compute)
        self.copy_seconds = copy_seconds
        self.log = []  # (dst data_ptr, bytes) of every copy, in the order the copy stream ran them

    def bind_thread(self):
        pass

    def compute_stream(self):
        return self.compute

    def event(self, timing=False, blocking=False):
        return FakeEvent()

    def record(self, ev, stream):
        ev._set.clear()

        def done():
            ev.t = time.perf_counter()
            ev._set.set()
        stream.put(done)

    def stream_wait(self, stream, ev):
        stream.put(ev._set.wait)

    def copy(self, dst, src):
        def run():
            time.sleep(self.copy_seconds)
            self.log.append((dst.data_ptr(), dst.numel() * dst.element_size()))
            with torch.inference_mode():  # as CudaOps.copy
                dst.copy_(src)
        self.copy_stream.put(run)

    def query(self, ev):
        return ev.query()

    def synchronize(self, ev):
        ev._set.wait()

    def elapsed_ms(self, a, b):
        return (b.t - a.t) * 1e3


def engine(ops, **kw):
    return CudaLinkEngine(torch.device("cpu"), ops=ops, **kw)


def test_a_demand_load_waits_behind_at_most_depth_chunks_of_queued_prefetches():
    ops = FakeOps()
    gate = threading.Event()
    ops.copy_stream.put(gate.wait)  # the link is busy until the test opens it: everything queues
    eng = engine(ops, chunk_bytes=256, depth=2)
    src = [torch.full((256,), float(i)) for i in range(5)]  # 1 KiB each: 4 chunks
    dst = [torch.zeros(256) for _ in range(5)]
    pre = [eng.load((0, i), src[i], dst[i], i, prefetch=True, priority=10.0 - i) for i in range(4)]
    demand = eng.load((1, 0), src[4], dst[4], 4)
    gate.set()
    eng.wait(demand)
    for h in pre:
        eng.wait(h)
    eng.drain()
    eng.close()
    order = [next(i for i, d in enumerate(dst) if d.data_ptr() <= p < d.data_ptr() + 1024) for p, _ in ops.log]
    assert order.index(4) <= 2  # behind at most 2 prefetch chunks (depth), not the 16 queued
    assert ops.log[order.index(4)][1] == 1024  # the demand load went whole
    assert all(torch.equal(a, b) for a, b in zip(src, dst))
    assert all(h.done() for h in pre + [demand])


def test_cancel_promote_and_value_order_of_queued_prefetches():
    ops = FakeOps()
    gate = threading.Event()
    ops.copy_stream.put(gate.wait)
    eng = engine(ops, chunk_bytes=1024, depth=1)
    src = [torch.full((256,), float(i)) for i in range(4)]
    dst = [torch.zeros(256) for _ in range(4)]
    h = [eng.load((0, i), src[i], dst[i], i, prefetch=True, priority=float(i)) for i in range(4)]
    # the first went onto the (empty) stream at once: it cannot be cancelled; the queued ones can
    assert eng.cancel(h[0]) is None
    assert eng.cancel(h[1]) == 1024
    with pytest.raises(CopyFailed, match="cancelled"):
        eng.wait(h[1])
    eng.promote(h[2])  # someone needs expert 2: it goes before expert 3 despite its lower value
    gate.set()
    for i in (0, 2, 3):
        eng.wait(h[i])
    eng.drain()
    eng.close()
    ptrs = [p for p, _ in ops.log]
    assert ptrs == [dst[0].data_ptr(), dst[2].data_ptr(), dst[3].data_ptr()]
    assert torch.equal(dst[1], torch.zeros(256))


def test_a_load_into_a_slot_waits_for_the_slots_last_use_on_a_lagging_device():
    # The compute stream lags the host: a read of slot 0 is queued behind a slow op; a later prefetch
    # into slot 0 must not overwrite it before the read (the fence). Without the fence the read sees Y.
    ops = FakeOps(sync_compute=False)
    eng = engine(ops, chunk_bytes=64)
    x, y = torch.full((64,), 1.0), torch.full((64,), 2.0)
    slot = torch.zeros(64)
    seen = []
    eng.wait(eng.load((0, 0), x, slot, 0))
    ops.compute.put(lambda: time.sleep(0.2))
    ops.compute.put(lambda: seen.append(slot.clone()))
    eng.fence(0)
    h = eng.load((0, 1), y, slot, 0, prefetch=True)
    eng.wait(h)
    done = threading.Event()
    ops.compute.put(done.set)
    assert done.wait(10)
    eng.close()
    assert torch.equal(seen[0], x) and torch.equal(slot, y)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m"))


def test_decoding_on_the_cuda_link_engine_is_exact_with_delays_and_failed_prefetches(model_path):
    # The real cache, prefetcher and offloaded experts on the engine (fake device, compute in step with
    # the host), copies in chunks of 128 bytes with delays, a third of the prefetches failing.
    caches = decode_with_failing_prefetches(model_path, lambda fail, rng: engine(
        FakeOps(copy_seconds=0.0005), faults=CopyFaults(fail=fail), chunk_bytes=128))
    for c in caches:
        assert c.engine.retries > 0
        c.engine.close()


def test_one_prefetch_keeps_depth_chunks_on_the_stream():
    # With the default window of one prefetch, the link must not idle between its chunks while the worker
    # wakes up: depth chunks of the same load are on the stream at once.
    ops = FakeOps()
    gate = threading.Event()
    ops.copy_stream.put(gate.wait)
    eng = engine(ops, chunk_bytes=256, depth=2)
    src, dst = torch.arange(256, dtype=torch.float32), torch.zeros(256)
    h = eng.load((0, 0), src, dst, 0, prefetch=True)
    assert [(lo_n[3]) for lo_n in eng._state.on_stream] == [256, 256]
    assert eng.bytes_before_landing(h) == 1024  # 512 on the stream, 512 queued
    gate.set()
    eng.wait(h)
    eng.drain()
    eng.close()
    assert torch.equal(dst, src) and eng.bytes_before_landing(h) is None


def test_cuda_ops_bind_the_worker_to_an_indexed_device(monkeypatch):
    # "cuda" without an index is the caller's current device; torch.cuda.set_device refuses it without
    # one, which would kill the worker thread at start on a GPU.
    from moe_offload.offload.cuda_link import CudaOps

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: ("stream", device))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    ops = CudaOps(torch.device("cuda"))
    ops.bind_thread()
    assert ops.copy_stream == ("stream", 1) and calls == [1]
    CudaOps(torch.device("cuda", 0)).bind_thread()
    assert calls == [1, 0]


def test_a_copy_that_keeps_failing_reaches_its_waiter_after_the_retries():
    eng = engine(FakeOps(), faults=CopyFaults(fail=lambda key: key == (0, 1)), chunk_bytes=64)
    src, dst = torch.ones(32), torch.zeros(32)
    ok = eng.load((0, 0), src, dst, 0)
    bad = eng.load((0, 1), src, torch.zeros(32), 1)
    eng.wait(ok)
    with pytest.raises(CopyFailed, match="injected copy failure"):
        eng.wait(bad)
    assert eng.retries == eng.max_retries and bad.done()
    eng.drain()
    eng.close()
    assert torch.equal(dst, src)
