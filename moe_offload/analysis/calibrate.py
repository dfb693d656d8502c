"""Calibration of the simulator against a published measurement: mixtral-offloading (Eliseev & Mazur,
arXiv 2312.17238, Table 2): Mixtral-8x7B-Instruct, HQQ 4-bit attention, 2-bit experts (~2.6 bits per
parameter), LRU with 4 experts per layer resident (2 on the RTX 3060), speculative prefetch of the next
layer. The hardware profiles stay as they are (datasheets); what belongs to that implementation is
the fitted parameter set "mixtral-offloading" in assets/reference_impls.json.

Each row is one command (`row_command`); `calibration_table` runs them all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from .bench import model_config, simulate
from .sim import ImplParams, get_hardware, get_impl
from .trace import RoutingTrace

REFERENCE = "mixtral-offloading"
MARGIN = 0.35  # a projection off the published figure by more than this (relative) is a missed row
CALIBRATION_TOKENS = 128  # the first tokens of the bundled held-out trace the fit used


@dataclass(frozen=True)
class Row:
    hardware: str
    capacity: int  # expert slots of Mixtral-8x7B (32 layers x experts per layer)
    published: float  # tokens/s, 2-bit experts
    expert_dtype: str = "int2"


ROWS = (Row("t4-pcie3", 128, 2.09), Row("rtx3060-pcie3", 64, 2.28), Row("rtx3080m-pcie4", 128, 2.66),
        Row("a100-pcie4", 128, 3.06))


def row_command(row: Row, trace_path: str = "TRACE.npz") -> str:
    return (f"moe-offload simulate --trace {trace_path} --hardware {row.hardware} --model-config mixtral-8x7b "
            f"--expert-dtype {row.expert_dtype} --capacity {row.capacity} --policy lru-layer --predictor next-gate "
            f"--lookahead 1 --implementation {REFERENCE} --max-tokens {CALIBRATION_TOKENS}")


def project(trace: RoutingTrace, row: Row, impl: ImplParams) -> float:
    """Projected tokens/s of one row (the same settings as row_command)."""
    return simulate(trace, model_config("mixtral-8x7b"), get_hardware(row.hardware), row.expert_dtype,
                    row.capacity, "next-gate", "lru-layer", lookahead=1, impl=impl,
                    deep_oracle_bound=False).tokens_per_second


def calibration_table(trace: RoutingTrace, impl: ImplParams | None = None,
                      rows: tuple[Row, ...] = ROWS) -> list[dict[str, Any]]:
    impl = impl or get_impl(REFERENCE)
    out = []
    for row in rows:
        got = project(trace, row, impl)
        err = got / row.published - 1
        out.append({"hardware": row.hardware, "expert_dtype": row.expert_dtype, "capacity": row.capacity,
                    "published_tokens_per_second": row.published, "projected_tokens_per_second": got,
                    "relative_error": err, "within_margin": abs(err) <= MARGIN, "command": row_command(row)})
    return out


def fit(trace: RoutingTrace, grid: dict[str, list[float]]) -> tuple[ImplParams, float]:
    """The grid point of the reference set minimising the worst relative error over ROWS."""
    base = get_impl(REFERENCE)
    best, best_err = base, float("inf")
    names = sorted(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        impl = replace(base, **dict(zip(names, values)))
        err = max(abs(project(trace, r, impl) / r.published - 1) for r in ROWS)
        if err < best_err:
            best, best_err = impl, err
    return best, best_err
