"""Demand-first link scheduling: the ONE ordering logic every copy engine with a host-side queue uses.

A load is split into chunks of at most `chunk_bytes`. The link moves one chunk at a time and, at every
chunk boundary, picks the next chunk:

1. demand loads first (someone is waiting for them), oldest first;
2. then prefetches, highest expected value first (probability of use / time until use, as the
   prefetcher estimates it), ties oldest first.

So a demand load waits behind at most the one prefetch chunk already on the link, never behind a queue
of prefetches. A queued prefetch can be promoted to demand (someone now needs it) or cancelled (a newer
plan superseded it) as long as none of its chunks is on the link at that moment.

The scheduler is pure bookkeeping (no threads, no clocks): ThreadCopyEngine drives it from a worker
thread in real time and analysis.sim.SimCopyEngine in virtual time, so the virtual-time tests run the
scheduling code the runtime runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..errors import MoeOffloadError

MIN_CHUNK_BYTES = 1 << 10  # smaller chunks cost more per-chunk overhead than they save (1e-6 MiB ran for minutes)
DEFAULT_CHUNK_BYTES = 8 << 20  # 8 MiB: ~0.3 ms at 25 GB/s, ~1/11 of an int4 Mixtral-8x7B expert


@dataclass(eq=False)
class LinkJob:
    """One load on the link: `nbytes` in chunks, of which `next_offset` bytes have been handed out."""

    handle: Any  # the engine's LoadHandle
    nbytes: int
    demand: bool
    priority: float
    seq: int
    next_offset: int = 0
    chunks_out: int = 0  # chunks of this job handed out and not yet done (an engine may keep several in flight)
    payload: Any = field(default=None, repr=False)  # engine data (src, dst)

    @property
    def remaining(self) -> int:
        return self.nbytes - self.next_offset


class LinkScheduler:
    """Chunked, demand-first, value-ordered queue of loads (see the module docstring)."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise MoeOffloadError(f"link chunk_bytes must be an integer >= 1, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        self._jobs: dict[int, LinkJob] = {}  # id(handle) -> job, queued or partly copied
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, handle: Any, nbytes: int, demand: bool, priority: float = 0.0, payload: Any = None) -> LinkJob:
        """Queue a load of `nbytes` (0 is allowed: one empty chunk)."""
        job = LinkJob(handle, max(0, int(nbytes)), demand, float(priority), next(self._seq), payload=payload)
        self._jobs[id(handle)] = job
        return job

    def job(self, handle: Any) -> LinkJob | None:
        return self._jobs.get(id(handle))

    def promote(self, handle: Any) -> None:
        """A waiter needs this load now: it becomes a demand load (keeps its place among demands by age)."""
        job = self._jobs.get(id(handle))
        if job is not None:
            job.demand = True

    def reprioritize(self, handle: Any, priority: float) -> None:
        """A newer plan values this queued prefetch differently."""
        job = self._jobs.get(id(handle))
        if job is not None:
            job.priority = float(priority)

    def cancel(self, handle: Any) -> int | None:
        """Drop a queued load. Returns the bytes that will never be copied, or None when it cannot be
        cancelled (unknown/finished, or one of its chunks is on the link now)."""
        job = self._jobs.get(id(handle))
        if job is None or job.chunks_out:
            return None
        del self._jobs[id(handle)]
        return job.remaining

    def demand_bytes_ahead(self, handle: Any) -> int | None:
        """Bytes the link sends before `handle`'s last byte once it is a demand load (as a waiter would
        make it): the older demand loads' unsent bytes and its own, not counting a chunk on the link now.
        None if it is not queued (landed, failed or unknown)."""
        job = self._jobs.get(id(handle))
        if job is None:
            return None
        return job.remaining + sum(j.remaining for j in self._jobs.values() if j.demand and j.seq < job.seq)

    def take(self, handle: Any) -> LinkJob | None:
        """Remove a load from the queue whatever its state, for an engine that copies the rest of it
        at once (a demand load put straight onto a stream). A chunk of it already on the link still
        reports chunk_done."""
        return self._jobs.pop(id(handle), None)

    def next_chunk(self) -> tuple[LinkJob, int, int] | None:
        """The chunk to copy next as (job, byte offset, byte count), marked on the link; None if idle.
        A job with chunks out stays eligible for its next chunk (an engine keeping several chunks on a
        stream); one that has handed out all its bytes is not."""
        best = None
        for job in self._jobs.values():
            if not job.remaining and (job.nbytes or job.chunks_out):  # all handed out (an empty load: once)
                continue
            rank = (not job.demand, -job.priority if not job.demand else 0.0, job.seq)
            if best is None or rank < best[0]:
                best = (rank, job)
        if best is None:
            return None
        job = best[1]
        lo = job.next_offset
        n = min(self.chunk_bytes, job.remaining)
        job.next_offset += n
        job.chunks_out += 1
        return job, lo, n

    def chunk_done(self, job: LinkJob) -> bool:
        """The chunk of `job` on the link has landed. Returns True when that was the job's last chunk."""
        job.chunks_out -= 1
        if job.remaining > 0 or job.chunks_out:
            return False
        self._jobs.pop(id(job.handle), None)
        return True

    def fail(self, job: LinkJob) -> None:
        """A chunk of `job` failed: the job leaves the queue (the caller reports the error)."""
        job.chunks_out = 0
        self._jobs.pop(id(job.handle), None)


def link_chunk_bytes(mb: float) -> int:
    """Tuning.link_chunk_mb (validated there: > 0) in bytes, at least MIN_CHUNK_BYTES."""
    n = int(mb * (1 << 20))
    if n < MIN_CHUNK_BYTES:
        raise MoeOffloadError(f"tuning.link_chunk_mb {mb!r} is under the smallest chunk, {MIN_CHUNK_BYTES // 1024} KiB "
                              f"({MIN_CHUNK_BYTES / (1 << 20):g} MiB)")
    return n
