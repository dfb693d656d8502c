"""Benchmark result files: metadata every result carries, and atomic JSON writes."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str | None = None) -> str:
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def shown(arg: str) -> str:
    """A command-line argument as a result file records it: a path inside the repository relative to
    it, any other absolute path by its file name only (no machine paths in results)."""
    if not os.path.isabs(arg):
        return arg
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(arg).resolve().relative_to(root))
    except ValueError:
        return Path(arg).name


def result_metadata(device: torch.device | str | None = None) -> dict[str, Any]:
    """command, git commit, date, device and library versions, for the top of every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"command": " ".join([Path(sys.argv[0]).name] + [shown(a) for a in sys.argv[1:]]), "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file would be (mkstemp makes it private)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
