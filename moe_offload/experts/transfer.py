"""Copy engine: host expert rows -> device slots, asynchronously, with an event per load.

CudaCopyEngine uses a dedicated copy stream and events; ThreadCopyEngine is its CPU twin (a worker
thread does the copies) with the same interface and semantics, so CI exercises the real logic.
Both take fault-injection hooks (delay a copy, fail a copy) for tests.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import MoeOffloadError

Key = tuple[int, int]


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
        self.cuda_event: torch.cuda.Event | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        if self.cuda_event is not None:
            return self.cuda_event.query()
        return self._done.is_set()


class CopyEngine(ABC):
    """Interface. load() queues a copy; wait() makes compute wait for it and returns seconds stalled;
    fence(slot) marks that compute has used a slot, so no later load overwrites it before that use."""

    def __init__(self, faults: CopyFaults | None = None):
        self.faults = faults or CopyFaults()

    @abstractmethod
    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int) -> LoadHandle:
        """Queue a copy of src into dst (slot `slot`)."""

    @abstractmethod
    def wait(self, handle: LoadHandle) -> float:
        """Make compute wait for the copy; seconds the compute side stalled. Raises CopyFailed."""

    def fence(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass

    def _failure(self, handle: LoadHandle) -> CopyFailed:
        return CopyFailed(f"copy of expert {handle.key[1]} of layer {handle.key[0]} into slot {handle.slot} "
                          f"failed: {handle.error}")


def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A plain memcpy through numpy (releases the GIL, no OpenMP): torch's copy_ would share the
    intra-op thread pool with the compute thread and stall it."""
    if dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype and dst.numel() == src.numel():
        np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
    else:
        dst.copy_(src)


class ThreadCopyEngine(CopyEngine):
    """CPU twin: a single worker thread copies in FIFO order while the caller computes."""

    def __init__(self, faults: CopyFaults | None = None):
        super().__init__(faults)
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="moe-offload-copy", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            handle, src, dst = item
            try:
                if self.faults.delay is not None:
                    time.sleep(self.faults.delay(handle.key))
                if self.faults.fail is not None and self.faults.fail(handle.key):
                    raise RuntimeError("injected copy failure")
                _host_copy(dst, src)
            except BaseException as exc:  # reported to the waiter, never lost in the thread
                handle.error = exc
            finally:
                handle._done.set()

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int) -> LoadHandle:
        handle = LoadHandle(key, slot)
        self._queue.put((handle, src, dst))
        return handle

    def wait(self, handle: LoadHandle) -> float:
        t0 = time.perf_counter()
        handle._done.wait()
        stalled = time.perf_counter() - t0
        if handle.error is not None:
            raise self._failure(handle)
        return stalled

    def close(self) -> None:
        self._queue.put(None)


class CudaCopyEngine(CopyEngine):
    """Copies on a dedicated CUDA stream from pinned memory; one event per load; slot fences.

    wait(): if the load's event has not completed, the host blocks on it (timed as stall), then the
    compute stream waits on the event, so the kernel never reads a slot before its copy completed.
    fence(slot): an event on the compute stream after the slot's last use; the next load into that
    slot makes the copy stream wait on it, so a slot is never overwritten while a kernel may read it.
    """

    def __init__(self, device: torch.device, faults: CopyFaults | None = None):
        super().__init__(faults)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # One reusable event per slot (created on first use, re-recorded at every fence): a copy into
        # a slot waits for the latest record, i.e. the compute stream's last use of that slot.
        self._last_use: dict[int, torch.cuda.Event] = {}

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
            handle.cuda_event = torch.cuda.Event()
            handle.cuda_event.record(self.stream)
        return handle

    def wait(self, handle: LoadHandle) -> float:
        if handle.error is not None:
            raise self._failure(handle)
        t0 = time.perf_counter()
        if not handle.cuda_event.query():
            handle.cuda_event.synchronize()
        stalled = time.perf_counter() - t0
        torch.cuda.current_stream(self.device).wait_event(handle.cuda_event)
        return stalled

    def fence(self, slot: int) -> None:
        ev = self._last_use.get(slot)
        if ev is None:
            ev = self._last_use[slot] = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))


def make_copy_engine(device: torch.device, faults: CopyFaults | None = None) -> CopyEngine:
    return CudaCopyEngine(device, faults) if device.type == "cuda" else ThreadCopyEngine(faults)
