"""Cache statistics: totals and per layer, with the contract's key names. hits + misses == uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FIELDS = ("uses", "hits", "misses", "prefetch_hits", "prefetch_wasted", "bytes_h2d", "stall_seconds",
          "cpu_experts")


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

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in FIELDS:
            dtype = np.float64 if name == "stall_seconds" else np.int64
            setattr(self, name, np.zeros(self.num_layers, dtype=dtype))

    def totals(self) -> dict[str, Any]:
        return {name: _py(getattr(self, name).sum()) for name in FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Totals at the top level plus the same keys for each layer under per_layer."""
        per_layer = [{name: _py(getattr(self, name)[l]) for name in FIELDS} for l in range(self.num_layers)]
        out = self.totals()
        out["hit_rate"] = out["hits"] / out["uses"] if out["uses"] else 0.0
        out["per_layer"] = per_layer
        return out

    def check(self) -> None:
        """The invariant every run must keep."""
        if not np.array_equal(self.hits + self.misses, self.uses):
            raise AssertionError(f"cache stats broken: hits {self.hits} + misses {self.misses} != uses {self.uses}")


def _py(v: Any) -> Any:
    return float(v) if isinstance(v, (np.floating, float)) else int(v)
