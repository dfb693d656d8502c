"""Copy engines: host expert rows -> device slots, asynchronously, with a handle per load.

cuda_link.CudaLinkEngine uses a dedicated copy stream and events; ThreadCopyEngine is its CPU twin (a worker
thread does the copies) with the same interface and semantics, so CI exercises the real logic.
Both take fault-injection hooks (delay a copy, fail a copy) for tests. Both implement
protocols.CopyEngine.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import MoeOffloadError
from .link import DEFAULT_CHUNK_BYTES, LinkScheduler
from .protocols import CopyEngine, Key
from .rows import Segments, host_copy_bytes


# A failed copy is tried again this many times before its waiter sees CopyFailed (transient faults).
COPY_RETRIES = 3


class CopyFailed(MoeOffloadError):
    """A host-to-device expert copy failed; the cache has dropped that expert and stays usable."""


@dataclass
class CopyFaults:
    """Test hooks: delay(key) -> seconds to sleep before copying; fail(key) -> True to fail it."""

    delay: Callable[[Key], float] | None = None
    fail: Callable[[Key], bool] | None = None


class LoadHandle:
    """One in-flight load of expert `key` into `slot`."""

    def __init__(self, key: Key, slot: int):
        self.key, self.slot = key, slot
        self.error: BaseException | None = None
        self.prefetch = False  # set by the cache: a speculative load nobody asked for yet
        self.page_cache: tuple[int, int] | None = None  # set by the cache: (bytes checked, not resident) at issue
        self.counted = True  # its bytes are in the cache's current statistics window
        self.cuda_event: torch.cuda.Event | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        if self.cuda_event is not None:
            return self.cuda_event.query()  # a query, not a wait: no host sync
        return self._done.is_set()


def copy_failure(handle: LoadHandle) -> CopyFailed:
    return CopyFailed(f"copy of expert {handle.key[1]} of layer {handle.key[0]} into slot {handle.slot} "
                      f"failed: {handle.error}")


def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A plain memcpy through numpy (releases the GIL, no OpenMP): torch's copy_ would share the
    intra-op thread pool with the compute thread and stall it."""
    if dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype and dst.numel() == src.numel():
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
    else:
        dst.copy_(src)


class CopyCancelled(MoeOffloadError):
    """A queued prefetch was cancelled before it landed (a newer plan superseded it)."""


def _copy_chunk(dst: torch.Tensor, src: torch.Tensor | Segments, lo: int, n: int) -> None:
    """Copy bytes [lo, lo + n) of one expert row (a tensor, or the pieces of a memory-mapped file)."""
    if isinstance(src, Segments):
        host_copy_bytes(dst, src, lo, n)
        return
    if lo == 0 and n >= src.numel() * src.element_size():
        _host_copy(dst, src)
        return
    np.copyto(dst.view(torch.uint8).numpy()[lo:lo + n], src.view(torch.uint8).numpy()[lo:lo + n])


# Every copy worker still running, engine collected or not: (its shared state, its thread) by id(state).
_WORKERS: dict[int, tuple["_LinkState", threading.Thread]] = {}


@atexit.register
def _stop_workers() -> None:
    """Stop and join every copy worker before the interpreter tears down. Also the workers of engines
    already garbage-collected (their finalizer only asked them to stop): a worker still inside a copy
    when finalization starts is killed mid-C++ and aborts the process ("terminate called")."""
    workers = list(_WORKERS.values())
    for state, _ in workers:
        state.close()
    for _, thread in workers:
        thread.join(timeout=10)


def _copy_with_retries(state: "_LinkState", handle: LoadHandle, src: torch.Tensor, dst: torch.Tensor,
                       lo: int, n: int) -> None:
    """One chunk, tried up to 1 + state.max_retries times (a chunk is idempotent: the same bytes again)."""
    for attempt in range(state.max_retries + 1):
        faults = state.faults
        try:
            if lo == 0 and faults.delay is not None:
                time.sleep(faults.delay(handle.key))
            if lo == 0 and faults.fail is not None and faults.fail(handle.key):
                raise RuntimeError("injected copy failure")
            _copy_chunk(dst, src, lo, n)
            return
        except Exception:
            if attempt == state.max_retries:
                raise
            with state.cond:
                state.retries += 1


def _copy_worker(state: "_LinkState") -> None:
    """The ThreadCopyEngine's thread: takes chunks from the link scheduler (demand first, then
    prefetches by value) and copies them. It holds the shared state, not the engine, so the engine
    can be garbage-collected (its finalizer then stops this thread)."""
    try:
        _copy_loop(state)
    finally:
        _WORKERS.pop(id(state), None)


def _copy_loop(state: "_LinkState") -> None:
    while True:
        with state.cond:
            while True:
                item = state.sched.next_chunk()
                if item is not None or state.closed:
                    break
                state.cond.wait()
            if item is not None:
                state.busy += 1
                state.busy_bytes += item[2]
        if item is None:
            return
        job, lo, n = item
        handle, (src, dst) = job.handle, job.payload
        try:
            _copy_with_retries(state, handle, src, dst, lo, n)
        except BaseException as exc:  # reported to the waiter, never lost in the thread
            with state.cond:
                state.busy -= 1
                state.busy_bytes -= n
                state.sched.fail(job)
                handle.error = exc
                handle._done.set()
                state.cond.notify_all()
            continue
        with state.cond:
            state.busy -= 1
            state.busy_bytes -= n
            if state.sched.chunk_done(job):
                handle._done.set()
            state.cond.notify_all()


class _LinkState:
    """What the engine and its worker thread share: the scheduler, its lock, the faults, closed."""

    def __init__(self, chunk_bytes: int, faults: CopyFaults):
        self.sched = LinkScheduler(chunk_bytes)
        self.cond = threading.Condition()
        self.faults = faults
        self.closed = False
        self.max_retries = COPY_RETRIES
        self.retries = 0  # copies tried again after a failure, since the engine started
        self.busy = 0  # chunks taken by the worker and not finished
        self.busy_bytes = 0  # their bytes

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Forwarded:
    """An attribute that lives on a part of its owner: `obj.<via>.<name>` (an engine's knobs on its
    worker's shared state, the expert backend's prefetcher on its step planner)."""

    def __init__(self, via: str = "_state"):
        self.via = via

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(getattr(obj, self.via), self.name)

    def __set__(self, obj, value) -> None:
        setattr(getattr(obj, self.via), self.name, value)


class EngineKnobs(CopyEngine):
    """What the thread and CUDA engines share through `self._state` (their worker thread's state, under
    its condition): faults (tests swap them at run time), retries, max_retries, and the link
    scheduler's promote / reprioritize / cancel."""

    faults = Forwarded()  # CopyFaults
    max_retries = Forwarded()  # int

    @property
    def retries(self) -> int:
        """Copies tried again after a transient failure, since the engine started."""
        return self._state.retries

    def promote(self, handle: LoadHandle) -> None:
        """Someone needs this (prefetch) load now: it overtakes the queued prefetches."""
        with self._state.cond:
            self._state.sched.promote(handle)

    def reprioritize(self, handle: LoadHandle, priority: float) -> None:
        with self._state.cond:
            self._state.sched.reprioritize(handle, priority)

    def cancel(self, handle: LoadHandle) -> int | None:
        """Cancel a queued load; returns the bytes never copied, or None if a chunk of it is on the
        link now (or it already finished). A cancelled handle is done, with a CopyCancelled error."""
        with self._state.cond:
            unsent = self._state.sched.cancel(handle)
            if unsent is not None:
                handle.error = CopyCancelled(f"load of expert {handle.key} cancelled")
                handle._done.set()
            return unsent


def injected_failure(faults: CopyFaults, key: Key, counter) -> bool:
    """Whether the test hook faults.fail fails `key` for good: a failure is transient, tried again up to
    counter.max_retries times (each retry counted in counter.retries)."""
    tries = 0
    while faults.fail is not None and faults.fail(key):
        if tries == counter.max_retries:
            return True
        tries += 1
        counter.retries += 1
    return False


class ThreadCopyEngine(EngineKnobs):
    """CPU twin: one worker thread is the link; copies move in chunks, demand loads first, then
    prefetches by expected value (offload.link.LinkScheduler). A queued prefetch can be promoted
    (someone waits for it) or cancelled. close() (or garbage collection of the engine) stops the
    thread after the queued copies."""

    def __init__(self, faults: CopyFaults | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._state = _LinkState(chunk_bytes, faults or CopyFaults())  # tests swap faults at run time
        self._worker = threading.Thread(target=_copy_worker, args=(self._state,),
                                        name="moe-offload-copy", daemon=True)
        _WORKERS[id(self._state)] = (self._state, self._worker)
        self._worker.start()
        self._finalizer = weakref.finalize(self, self._state.close)
        self._finalizer.atexit = False  # _stop_workers stops and joins it at exit instead

    @property
    def demand_wait_bytes(self) -> int:
        """The most prefetch bytes a demand copy waits behind: the one chunk on the link."""
        return self._state.sched.chunk_bytes

    def drain(self) -> None:
        """Wait until every queued copy has finished (or failed): the link is idle."""
        with self._state.cond:
            while (len(self._state.sched) or self._state.busy) and self._worker.is_alive():
                self._state.cond.wait(timeout=1.0)

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> LoadHandle:
        if not self._worker.is_alive() or self._state.closed:
            raise MoeOffloadError("copy engine is closed")
        handle = LoadHandle(key, slot)
        handle.prefetch = prefetch
        with self._state.cond:
            self._state.sched.submit(handle, src.numel() * src.element_size(), demand=not prefetch,
                                     priority=priority, payload=(src, dst))
            self._state.cond.notify_all()
        return handle

    def bytes_before_landing(self, handle: LoadHandle) -> int | None:
        """Bytes the link moves before this load lands if it is needed now (a chunk on the link counted
        whole), or None once it has landed."""
        if handle._done.is_set():
            return None
        with self._state.cond:
            ahead = self._state.sched.demand_bytes_ahead(handle)
            return (ahead or 0) + self._state.busy_bytes

    def wait(self, handle: LoadHandle) -> float:
        t0 = time.perf_counter()
        self.promote(handle)
        handle._done.wait()
        stalled = time.perf_counter() - t0
        if handle.error is not None:
            raise copy_failure(handle)
        return stalled

    def fence(self, slot: int) -> None:
        pass  # the worker copies only when the host asks, after the slot's compute returned

    def close(self) -> None:
        """Stop the worker after the copies already queued; idempotent."""
        self._finalizer()
        self._worker.join(timeout=10)
