"""Argument checks shared by the CLI and the Python API: one-line errors that name the flag or keyword.

Numbers are accepted as numbers.Integral / numbers.Real (numpy scalars included) and returned as
plain int / float; booleans are never numbers and strings are never booleans. As argparse types the
`*_arg` functions raise argparse.ArgumentTypeError, so argparse names the flag in its message.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable

from .errors import MoeOffloadError

SEED_MAX = 2**63 - 1


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """value as int, lo <= value <= hi; else MoeOffloadError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MoeOffloadError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MoeOffloadError(f"{name} must be an integer {_range(lo, hi)}, got {v}")
    return v


def real(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """value as a finite float in [lo, hi] (or (lo, hi] with lo_open); else MoeOffloadError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MoeOffloadError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise MoeOffloadError(f"{name} must be a finite number, got {v}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise MoeOffloadError(f"{name} must be {_range(lo, hi, lo_open)}, got {v}")
    return v


def boolean(name: str, value: Any, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise MoeOffloadError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice(name: str, value: Any, valid: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise MoeOffloadError(f"{name} must be one of {list(valid)}, got {value!r}")
    return value


def json_object(path: str | os.PathLike, missing: str, error: type[MoeOffloadError] = MoeOffloadError) -> dict:
    """A JSON file holding an object, read; `missing` says what was expected when there is no such file.
    Errors (no file, not JSON, not an object) name the path and raise `error`."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: {missing}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return raw


def output_file(path: str | os.PathLike, flag: str, create_parent: bool = True) -> Path:
    """Check an output file path before any work: not a folder, its folder exists (created when
    `create_parent`) and is writable. Returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise MoeOffloadError(f"{flag} {str(path)!r} is a folder; give a file path")
    if os.path.lexists(p) and not p.is_file():  # a device, pipe or dangling link: never replaced
        raise MoeOffloadError(f"{flag} {str(path)!r} exists and is not a regular file; give a new file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        if not create_parent:
            raise MoeOffloadError(f"{flag} {str(path)!r}: folder {str(parent)!r} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoeOffloadError(f"{flag} {str(path)!r}: cannot create folder {str(parent)!r}: {exc.strerror}") from None
    if not parent.is_dir():
        raise MoeOffloadError(f"{flag} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK):
        raise MoeOffloadError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable")
    return p


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"<= {hi}"


# --- argparse types ---------------------------------------------------------------------------------
def _arg(check: Callable[[Any], Any], parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'number' if parse is float else 'whole number'}: {text!r}") from None
        try:
            return check(value)
        except MoeOffloadError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value must", "must")) from None

    return convert


def int_arg(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [lo, hi]."""
    return _arg(lambda v: integer("value", v, lo, hi), int)


def float_arg(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] (or (lo, hi])."""
    return _arg(lambda v: real("value", v, lo, hi, lo_open), float)
