"""Cache statistics: totals and per layer, with the contract's key names. hits + misses == uses.

A memory-mapped store (a GGUF file) also counts page-cache misses: of the expert bytes its loads read
(page_cache_checked_bytes), those the OS reported not resident in the page cache when the load was
issued (page_cache_miss_bytes: read from disk). `page_cache` names how ("mincore"), "unknown" where the
OS cannot tell, None for a store that is not memory-mapped; the two counters are None unless "mincore"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FIELDS = ("uses", "hits", "misses", "prefetch_hits", "prefetch_wasted", "bytes_h2d", "stall_seconds",
          "cpu_experts")
PAGE_CACHE_FIELDS = ("page_cache_checked_bytes", "page_cache_miss_bytes")


@dataclass
class CacheStats:
    """Per-layer counters. A use is one (forward call, layer, distinct routed expert)."""

    num_layers: int
    uses: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    prefetch_hits: np.ndarray = field(init=False)
    prefetch_wasted: np.ndarray = field(init=False)
    bytes_h2d: np.ndarray = field(init=False)
    stall_seconds: np.ndarray = field(init=False)
    cpu_experts: np.ndarray = field(init=False)  # misses computed on the host by the CPU lane (hybrid)
    page_cache_checked_bytes: np.ndarray = field(init=False)  # mapped stores: bytes loads read (mincore asked)
    page_cache_miss_bytes: np.ndarray = field(init=False)  # of those, not in the page cache (read from disk)
    page_cache: str | None = None  # "mincore", "unknown" (a mapped store the OS cannot tell about), None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in FIELDS + PAGE_CACHE_FIELDS:
            dtype = np.float64 if name == "stall_seconds" else np.int64
            setattr(self, name, np.zeros(self.num_layers, dtype=dtype))

    def _fields(self) -> tuple[str, ...]:
        return FIELDS + PAGE_CACHE_FIELDS if self.page_cache == "mincore" else FIELDS

    def totals(self) -> dict[str, Any]:
        out = {name: _py(getattr(self, name).sum()) for name in self._fields()}
        out["page_cache"] = self.page_cache
        for name in PAGE_CACHE_FIELDS:
            out.setdefault(name, None)  # not counted: not a memory-mapped store, or the OS cannot tell
        return out

    def to_dict(self) -> dict[str, Any]:
        """Totals at the top level plus the same keys for each layer under per_layer (the page-cache
        counters there only where they are counted)."""
        names = self._fields()
        per_layer = [{name: _py(getattr(self, name)[l]) for name in names} for l in range(self.num_layers)]
        out = self.totals()
        out["hit_rate"] = out["hits"] / out["uses"] if out["uses"] else 0.0
        out["per_layer"] = per_layer
        return out

    def check(self) -> None:
        """The invariant every run must keep."""
        if not np.array_equal(self.hits + self.misses, self.uses):
            raise AssertionError(f"cache stats broken: hits {self.hits} + misses {self.misses} != uses {self.uses}")
        if np.any(self.page_cache_miss_bytes > self.page_cache_checked_bytes) or np.any(self.page_cache_miss_bytes < 0):
            raise AssertionError(f"cache stats broken: page-cache miss bytes {self.page_cache_miss_bytes} outside "
                                 f"[0, checked bytes {self.page_cache_checked_bytes}]")


def _py(v: Any) -> Any:
    return float(v) if isinstance(v, (np.floating, float)) else int(v)
