"""Tile configs as data: JSON tables keyed by token count M, nearest-M lookup, per-device files.

A table is {"device": ..., "source": ..., "configs": {"<M>": {block_m, block_n, block_k, num_warps,
num_stages}, ...}}. `tile_configs/<device name>.json` (written by benchmarks/tune_fused_moe.py on a GPU)
wins over `tile_configs/default.json`; the CPU (Triton interpreter) uses the "cpu" table in default.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

TABLE_DIR = Path(__file__).resolve().parent / "tile_configs"


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"tile config {name}={v}: must be a power of two >= 16 (tl.dot minimum)")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"tile config: num_warps and num_stages must be positive, got {self}")

    def as_dict(self) -> dict:
        return asdict(self)


def device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


@lru_cache(maxsize=None)
def load_table(key: str) -> dict[int, TileConfig]:
    """M -> TileConfig for a device key, from its own file or the default file's section."""
    own = TABLE_DIR / f"{key}.json"
    if own.is_file():
        raw = json.loads(own.read_text())["configs"]
    else:
        default = json.loads((TABLE_DIR / "default.json").read_text())
        raw = default["cpu" if key == "cpu" else "gpu"]
    return {int(m): TileConfig(**c) for m, c in raw.items()}


def nearest(table: dict[int, TileConfig], m: int) -> TileConfig:
    best = min(table, key=lambda key: (abs(key - m), key))
    return table[best]


def tile_config(m: int, device: torch.device) -> TileConfig:
    """The config for M = m tokens on `device` (nearest M in its table)."""
    return nearest(load_table(device_key(device)), m)
