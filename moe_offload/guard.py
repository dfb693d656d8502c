"""One model object shared by threads, streams and callbacks: calls are serialized, re-entry refused.

The KV cache and the expert cache of an OffloadedModel are single-occupancy. `CallGuard` makes every
call (`generate`, `logits`, each step of a stream) hold one lock, and records which call last wrote
the KV cache (`kv_owner`), so a stream resumed after another call knows its cache rows are stale and
re-prefills its tokens so far before the next step (see generate.decode_tokens(is_stale=...)).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import MoeOffloadError


class CallGuard:
    """A lock with an owner: nested holds by the same call are fine, another call from the same
    thread (a callback calling generate) is refused, other threads wait their turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._call: object | None = None
        self._depth = 0
        self.kv_owner: object | None = None  # the call whose tokens the KV cache holds
        # called when an exception (KeyboardInterrupt included) leaves the outermost hold: the model
        # brings its caches back to a consistent state (OffloadedModel._recover)
        self.on_error: Callable[[], None] | None = None

    @contextmanager
    def hold(self, call: object, what: str) -> Iterator[None]:
        """Serialize `call` against every other call on this model."""
        me = threading.get_ident()
        if self._thread == me:
            if self._call is not call:
                raise MoeOffloadError(
                    f"{what}: re-entrant call on a model that is busy in this thread (e.g. from a generate "
                    "callback); finish or exhaust the running call first, or use a stream and call between steps")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._lock.acquire()
        self._thread, self._call, self._depth = me, call, 1
        try:
            yield
        except BaseException as exc:
            self.kv_owner = None  # the KV rows of the interrupted call are no one's now
            if self.on_error is not None:
                try:
                    self.on_error()
                except Exception as rec:
                    raise MoeOffloadError(f"recovering from {type(exc).__name__} failed: {rec}") from exc
            raise
        finally:
            self._thread, self._call, self._depth = None, None, 0
            self._lock.release()

    def claim_kv(self, call: object) -> None:
        """`call` is about to write the KV cache from position 0 (or continue its own rows)."""
        self.kv_owner = call
