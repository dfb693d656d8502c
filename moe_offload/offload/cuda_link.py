"""CudaLinkEngine: the demand-first chunked link (offload.link) on a CUDA copy stream.

A CUDA stream runs its copies in the order they were enqueued and cannot reorder them, so the queue
lives on the host: prefetches wait in a LinkScheduler and a worker thread feeds the copy stream at most
`depth` chunks at a time (it blocks on the oldest chunk's event, in its own thread, never the decode
thread). A demand load, and a queued prefetch someone now waits for, goes onto the stream at once and
whole, from the caller's thread: it waits behind at most `depth` chunks already there, never behind the
queue. Queued prefetches can be promoted, re-valued or cancelled until their chunks are on the stream.

Slot safety: a load into a slot first makes the copy stream wait for the slot's last use, the event
`fence` recorded on the compute stream before the load was issued (a fresh event per fence, so the
load keeps the one it saw). The compute stream waits for a load's last event (`wait`, device-side).
No cycle: the compute work before a fence only waits for loads whose wait() ran before it, and those
are on the copy stream already, ahead of any chunk that waits for the fence.

The CUDA calls go through `CudaOps`, so tests run this engine's logic on a fake device (CPU threads).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any

import torch

from .link import DEFAULT_CHUNK_BYTES, LinkJob, LinkScheduler
from .protocols import Key
from .rows import Segments
from .transfer import (_WORKERS, COPY_RETRIES, CopyFaults, EngineKnobs, LoadHandle, copy_failure,
                       injected_failure)

LINK_DEPTH = 2  # chunks on the copy stream at once: 1 leaves the link idle while the worker wakes up


class CudaOps:
    """The CUDA calls CudaLinkEngine makes (one copy stream on `device`)."""

    def __init__(self, device: torch.device):
        self.device = device
        # the index now, in the caller's thread: "cuda" without one means the caller's current device,
        # and set_device refuses a device without an index
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.copy_stream = torch.cuda.Stream(device=self.index)

    def bind_thread(self) -> None:
        torch.cuda.set_device(self.index)

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def event(self, timing: bool = False, blocking: bool = False) -> Any:
        # blocking: the worker's synchronize() sleeps instead of spinning a core the CPU lane needs
        return torch.cuda.Event(enable_timing=timing, blocking=blocking)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def stream_wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # inference mode: the slot views were made in the decode thread's inference mode, and an
        # in-place copy into one from the worker thread is refused outside it
        with torch.inference_mode(), torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)

    def query(self, event: Any) -> bool:
        return event.query()

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end)


def _bytes(t: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """Bytes [lo, lo + n) of a contiguous tensor, as a uint8 view (view: a non-contiguous one fails loudly
    instead of copying into a temporary)."""
    return t.view(-1).view(torch.uint8)[lo:lo + n]


class _StreamState:
    """What the engine and its worker share (the worker holds this, not the engine, so the engine can
    be garbage-collected; its finalizer closes this)."""

    def __init__(self, ops: CudaOps, chunk_bytes: int, depth: int, faults: CopyFaults):
        self.ops, self.depth, self.faults = ops, depth, faults
        self.max_retries, self.retries = COPY_RETRIES, 0
        self.sched = LinkScheduler(chunk_bytes)
        self.cond = threading.Condition()
        self.on_stream: deque[tuple[LinkJob, Any, bool, int]] = deque()  # (job, event after it, from the queue, bytes)
        self.closed = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def failed(self, job: LinkJob) -> bool:
        """Injected faults (tests), checked when a load's first bytes would go onto the stream; a
        failure is transient up to max_retries, then the load fails (its waiter sees CopyFailed)."""
        if not injected_failure(self.faults, job.handle.key, self):
            return False
        self.sched.take(job.handle)
        job.handle.error = RuntimeError("injected copy failure")
        job.handle._done.set()
        return True

    def enqueue(self, job: LinkJob, lo: int, n: int, from_queue: bool) -> None:
        """Put bytes [lo, lo + n) of `job` on the copy stream (under cond). The job's first bytes wait
        for its slot's fence; its last bytes get the handle's event. Any failure fails the load (its
        waiter sees it) and leaves the queue consistent; an interrupt is re-raised after that."""
        src, dst, fence = job.payload
        ops = self.ops
        try:
            if lo == 0 and self.failed(job):
                return
            if lo == 0 and fence is not None:
                ops.stream_wait(ops.copy_stream, fence)
            if n and isinstance(src, Segments):  # pieces of a memory-mapped file (pageable: the driver stages them)
                for off, part in src.pieces(lo, n):
                    ops.copy(_bytes(dst, off, part.numel()), part)
            elif n:
                whole = lo == 0 and n == job.nbytes
                ops.copy(dst if whole else _bytes(dst, lo, n), src if whole else _bytes(src, lo, n))
            last = job.remaining == 0
            ev = ops.event(timing=last, blocking=True)
            ops.record(ev, ops.copy_stream)
        except BaseException as exc:  # reported to the waiter, never lost in the worker thread
            self.sched.fail(job)
            job.handle.error = exc
            job.handle._done.set()
            if not isinstance(exc, Exception):
                raise
            return
        if last:
            job.handle.cuda_event = ev
        self.on_stream.append((job, ev, from_queue, n))

    def retire(self) -> None:
        """Drop the finished chunks at the head of the stream (a query each, no wait; under cond)."""
        while self.on_stream and self.ops.query(self.on_stream[0][1]):
            job, _, from_queue, _ = self.on_stream.popleft()
            if from_queue:
                self.sched.chunk_done(job)

    def fill(self) -> None:
        """Queued prefetch chunks onto the stream while fewer than `depth` are there (under cond)."""
        while len(self.on_stream) < self.depth:
            item = self.sched.next_chunk()
            if item is None:
                return
            self.enqueue(*item, from_queue=True)


def _worker(state: _StreamState) -> None:
    try:
        state.ops.bind_thread()
        while True:
            with state.cond:
                state.fill()
                while not state.on_stream and not (state.closed and not len(state.sched)):
                    state.cond.wait()
                    state.fill()
                if not state.on_stream:
                    return
                ev = state.on_stream[0][1]
            state.ops.synchronize(ev)  # this thread only
            with state.cond:
                state.retire()  # that chunk and any after it (the decode thread may have retired it already)
                state.cond.notify_all()
    finally:
        _WORKERS.pop(id(state), None)


class CudaLinkEngine(EngineKnobs):
    """Copy engine with a demand-first chunked link on a CUDA copy stream (see the module docstring).
    The protocols.CopyEngine of cuda devices."""

    def __init__(self, device: torch.device, faults: CopyFaults | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = LINK_DEPTH, ops: CudaOps | None = None):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"link depth must be an integer >= 1, got {depth!r}")
        self.device = device
        self.ops = ops or CudaOps(device)
        self._state = _StreamState(self.ops, chunk_bytes, depth, faults or CopyFaults())
        self._last_use: dict[int, Any] = {}  # slot -> the compute-stream event of its last use
        self._waits: list[tuple[int, Any, Any]] = []  # (layer, copy done, needed)
        self._thread = threading.Thread(target=_worker, args=(self._state,), name="moe-offload-cuda-link",
                                        daemon=True)
        _WORKERS[id(self._state)] = (self._state, self._thread)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._state.close)
        self._finalizer.atexit = False  # transfer._stop_workers stops and joins it at exit instead

    @property
    def chunk_bytes(self) -> int:
        return self._state.sched.chunk_bytes

    @property
    def demand_wait_bytes(self) -> int:
        """The most prefetch bytes a demand copy waits behind: the chunks already on the stream."""
        return self._state.depth * self._state.sched.chunk_bytes

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> LoadHandle:
        handle = LoadHandle(key, slot)
        handle.prefetch = prefetch
        if self.faults.delay is not None:  # a test hook: the caller is slowed
            time.sleep(self.faults.delay(key))
        st = self._state
        with st.cond:
            job = st.sched.submit(handle, src.numel() * src.element_size(), demand=not prefetch, priority=priority,
                                  payload=(src, dst, self._last_use.get(slot)))
            if prefetch:
                st.retire()
                st.fill()
                st.cond.notify_all()
            else:
                self._put_rest(job)
        return handle

    def _put_rest(self, job: LinkJob) -> None:
        """All of a job's bytes not yet handed out, onto the stream now (under cond)."""
        st = self._state
        st.sched.take(job.handle)  # out of the queue (a chunk of it already on the stream stays there)
        lo, n = job.next_offset, job.remaining
        job.next_offset = job.nbytes
        st.enqueue(job, lo, n, from_queue=False)

    def pump(self) -> None:
        """From the decode thread at every load, wait and fence: retire finished chunks and refill the
        stream without blocking, so the link does not idle while the worker waits for the GIL."""
        st = self._state
        with st.cond:
            st.retire()
            st.fill()

    def bytes_before_landing(self, handle: LoadHandle) -> int | None:
        """Bytes the link moves before this load lands if it is needed now (the chunks on the stream
        counted whole), or None once it has landed. A query per chunk on the stream, no wait."""
        st = self._state
        with st.cond:
            st.retire()
            if handle.cuda_event is not None and self.ops.query(handle.cuda_event) or handle._done.is_set():
                return None
            ahead = st.sched.demand_bytes_ahead(handle)
            return (ahead or 0) + sum(n for *_, n in st.on_stream)

    def wait(self, handle: LoadHandle) -> float:
        """The compute stream waits (on the device) for the load; a load still queued goes onto the
        copy stream first, whole. Returns 0.0: the host does not block."""
        if handle.error is not None:
            raise copy_failure(handle)
        st, ops = self._state, self.ops
        with st.cond:
            if handle.cuda_event is None:
                job = st.sched.job(handle)
                if job is not None:
                    self._put_rest(job)
            st.retire()
            st.fill()
        if handle.error is not None or handle.cuda_event is None:  # failed going onto the stream, or cancelled
            raise copy_failure(handle)
        compute = ops.compute_stream()
        if not ops.query(handle.cuda_event):
            needed = ops.event(timing=True)
            ops.record(needed, compute)
            self._waits.append((handle.key[0], handle.cuda_event, needed))
        ops.stream_wait(compute, handle.cuda_event)
        return 0.0

    def fence(self, slot: int) -> None:
        ev = self.ops.event()  # a fresh event: a load already issued keeps the fence it saw
        self.ops.record(ev, self.ops.compute_stream())
        self._last_use[slot] = ev
        self.pump()

    def drain_stalls(self) -> list[tuple[int, float]]:
        """(layer, seconds compute waited) for every late copy whose events have completed."""
        out, keep = [], []
        for layer, done, needed in self._waits:
            if self.ops.query(done) and self.ops.query(needed):
                out.append((layer, max(0.0, self.ops.elapsed_ms(needed, done)) / 1e3))
            else:
                keep.append((layer, done, needed))
        self._waits = keep
        return out

    def drain(self) -> None:
        """Wait until every queued copy is on the stream and has finished (error recovery only)."""
        st = self._state
        with st.cond:
            while len(st.sched) or st.on_stream:
                st.retire()
                st.fill()  # progress even without the worker (error recovery)
                if not st.on_stream:
                    break
                st.cond.wait(timeout=0.01)

    def close(self) -> None:
        """Stop the worker after the queued copies; idempotent."""
        self._finalizer()
        self._thread.join(timeout=10)
