"""The serving engine: one thread steps the BatchScheduler; asyncio handlers await tokens from it."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..batch import BatchRequest, BatchScheduler
from ..generate import SamplingParams

if TYPE_CHECKING:
    from ..runtime import OffloadedModel

_DONE = object()


@dataclass
class Counters:
    """Totals since the server started (read by /metrics)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # by (route template, status)
    errors: dict[int, int] = field(default_factory=dict)  # by HTTP status
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cancelled: int = 0
    busy_seconds: float = 0.0  # wall time the engine spent stepping
    ttft: "Histogram" = field(default_factory=lambda: Histogram(
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)))
    itl: "Histogram" = field(default_factory=lambda: Histogram(
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)))
    latency: "Histogram" = field(default_factory=lambda: Histogram(
        (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)))


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += v
        self.count += 1


class Engine:
    """Owns the scheduler and its stepping thread. `stream(prompt_ids, params)` yields token ids."""

    def __init__(self, om: "OffloadedModel", max_batch: int = 8):
        self.om = om
        self.scheduler = BatchScheduler(om, max_batch)
        self.counters = Counters()
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moe-offload-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sched = self.scheduler
        while not self._stop:
            if sched.idle():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                sched.step()
            except BaseException as exc:  # fail every request in flight; keep serving
                self.error = exc
                self.om._recover()  # no pin, slot or copy left dangling in the expert cache
                for r in list(sched.active) + list(sched.waiting):
                    r.finish_reason = "error"
                    if r.on_finish is not None:
                        r.on_finish(r)
                sched.active.clear()
                sched.waiting.clear()
            self.counters.busy_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self.scheduler.active)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sampler=None,
               stop_ids: tuple[int, ...] = ()) -> "TokenStream":
        """Queue a request (call from the event loop); iterate the returned stream for its token ids.
        `sampler` (serve.sampling.ChoiceSampler) replaces the default sampling and may ask for the
        prompt's logits (echo); tokens in `stop_ids` end the request like EOS."""
        stream = TokenStream(self, asyncio.get_running_loop())
        req = BatchRequest(list(prompt_ids), params, on_token=stream._on_token, on_finish=stream._on_finish,
                           sampler=sampler, stop_ids=tuple(stop_ids),
                           on_prompt_logits=sampler.on_prompt_logits
                           if sampler is not None and sampler.prompt_logprobs is not None else None)
        stream.request = req
        self.counters.prompt_tokens += len(prompt_ids)
        self.scheduler.submit(req)
        self._wake.set()
        return stream

    def cancel(self, req: BatchRequest) -> None:
        if not req.done:
            self.counters.cancelled += 1
            self.scheduler.cancel(req)
            self._wake.set()


class TokenStream:
    """Async iterator of one request's token ids; `request.finish_reason` is set once it ends.
    `cancel()` (e.g. the client went away) frees the request's batch row at the next step."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self._loop = engine, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.request: BatchRequest
        self._t0 = time.perf_counter()
        self._last: float | None = None

    def _on_token(self, req: BatchRequest, tok: int) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, tok)

    def _on_finish(self, req: BatchRequest) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _DONE)

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _DONE:
            raise StopAsyncIteration
        c = self.engine.counters
        c.generation_tokens += 1
        now = time.perf_counter()
        if self._last is None:
            c.ttft.observe(now - self._t0)
        else:
            c.itl.observe(now - self._last)
        self._last = now
        return item

    def cancel(self) -> None:
        self.engine.cancel(self.request)
