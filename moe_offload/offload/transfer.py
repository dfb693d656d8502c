"""Copy engines: host expert rows -> device slots, asynchronously, with a handle per load.

CudaCopyEngine uses a dedicated copy stream and events; ThreadCopyEngine is its CPU twin (a worker
thread does the copies) with the same interface and semantics, so CI exercises the real logic.
Both take fault-injection hooks (delay a copy, fail a copy) for tests. Both implement
protocols.CopyEngine.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import MoeOffloadError
from .protocols import Key


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


def _copy_worker(jobs: queue.Queue, faults_box: list[CopyFaults]) -> None:
    """The ThreadCopyEngine's thread. It holds the queue, not the engine, so the engine can be
    garbage-collected (its finalizer then stops this thread)."""
    while True:
        item = jobs.get()
        if item is None:
            return
        handle, src, dst = item
        faults = faults_box[0]
        try:
            if faults.delay is not None:
                time.sleep(faults.delay(handle.key))
            if faults.fail is not None and faults.fail(handle.key):
                raise RuntimeError("injected copy failure")
            _host_copy(dst, src)
        except BaseException as exc:  # reported to the waiter, never lost in the thread
            handle.error = exc
        finally:
            handle._done.set()


class ThreadCopyEngine:
    """CPU twin: a single worker thread copies in FIFO order while the caller computes.
    close() (or garbage collection of the engine) stops the thread."""

    def __init__(self, faults: CopyFaults | None = None):
        self._faults_box = [faults or CopyFaults()]  # shared with the worker; tests swap faults at run time
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=_copy_worker, args=(self._jobs, self._faults_box),
                                        name="moe-offload-copy", daemon=True)
        self._worker.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)
        self._finalizer.atexit = False  # at exit the daemon thread just stops with the process

    @property
    def faults(self) -> CopyFaults:
        return self._faults_box[0]

    @faults.setter
    def faults(self, value: CopyFaults) -> None:
        self._faults_box[0] = value

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int) -> LoadHandle:
        if not self._worker.is_alive():
            raise MoeOffloadError("copy engine is closed")
        handle = LoadHandle(key, slot)
        self._jobs.put((handle, src, dst))
        return handle

    def wait(self, handle: LoadHandle) -> float:
        t0 = time.perf_counter()
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


class CudaCopyEngine:
    """Copies on a dedicated CUDA stream from pinned memory; one event per load; slot fences.

    wait(): the compute stream waits on the load's event (a device-side wait: the host does not
    block), so a kernel never reads a slot before its copy completed. How long compute waited is
    measured from timed events afterwards (`drain_stalls`), not by blocking the host.
    fence(slot): an event on the compute stream after the slot's last use; the next load into that
    slot makes the copy stream wait on it, so a slot is never overwritten while a kernel may read it.
    """

    def __init__(self, device: torch.device, faults: CopyFaults | None = None):
        self.faults = faults or CopyFaults()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # One reusable event per slot (created on first use, re-recorded at every fence): a copy into
        # a slot waits for the latest record, i.e. the compute stream's last use of that slot.
        self._last_use: dict[int, torch.cuda.Event] = {}
        self._waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []  # (layer, copy done, needed)

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int) -> LoadHandle:
        handle = LoadHandle(key, slot)
        if self.faults.delay is not None:
            time.sleep(self.faults.delay(key))
        if self.faults.fail is not None and self.faults.fail(key):
            handle.error = RuntimeError("injected copy failure")
            handle._done.set()
            return handle
        fence = self._last_use.get(slot)
        with torch.cuda.stream(self.stream):
            if fence is not None:
                self.stream.wait_event(fence)
            dst.copy_(src, non_blocking=True)
            handle.cuda_event = torch.cuda.Event(enable_timing=True)
            handle.cuda_event.record(self.stream)
        return handle

    def wait(self, handle: LoadHandle) -> float:
        if handle.error is not None:
            raise copy_failure(handle)
        compute = torch.cuda.current_stream(self.device)
        if not handle.cuda_event.query():
            needed = torch.cuda.Event(enable_timing=True)
            needed.record(compute)
            self._waits.append((handle.key[0], handle.cuda_event, needed))
        compute.wait_event(handle.cuda_event)
        return 0.0

    def drain_stalls(self) -> list[tuple[int, float]]:
        """(layer, seconds compute waited) for every late copy whose events have completed."""
        out, keep = [], []
        for layer, done, needed in self._waits:
            if done.query() and needed.query():
                out.append((layer, max(0.0, needed.elapsed_time(done)) / 1e3))
            else:
                keep.append((layer, done, needed))
        self._waits = keep
        return out

    def fence(self, slot: int) -> None:
        ev = self._last_use.get(slot)
        if ev is None:
            ev = self._last_use[slot] = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        pass


def make_copy_engine(device: torch.device, faults: CopyFaults | None = None):
    return CudaCopyEngine(device, faults) if device.type == "cuda" else ThreadCopyEngine(faults)
