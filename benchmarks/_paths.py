"""How result files name a path: relative to the repository when inside it, else by its last part only,
so no result records a machine's folder layout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return p.name


def env_path(value: str | None, env: str) -> Path | None:
    """A folder given on the command line, else from the environment variable `env`, else None."""
    value = value or os.environ.get(env)
    return Path(value).expanduser() if value else None
