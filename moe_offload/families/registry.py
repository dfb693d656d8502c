"""model_type -> Family: the families this runtime supports."""

from __future__ import annotations

from .base import Family

_FAMILIES: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Add a family under its model_type (a second one under the same name only with replace=True)."""
    if not isinstance(family, Family) or not family.model_type:
        raise TypeError(f"register: expected a Family instance with a model_type, got {family!r}")
    if family.model_type in _FAMILIES and not replace:
        raise ValueError(f"register: a family {family.model_type!r} is registered already")
    _FAMILIES[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    """Remove a family (tests that register one of their own)."""
    _FAMILIES.pop(model_type, None)


def find(model_type: object) -> Family | None:
    """The family of this config.json model_type, or None when unsupported."""
    return _FAMILIES.get(model_type) if isinstance(model_type, str) else None


def get(model_type: str) -> Family:
    family = find(model_type)
    if family is None:
        raise KeyError(f"model_type {model_type!r} is not a registered family; supported: {supported()}")
    return family


def supported() -> list[str]:
    """The registered model_types, sorted."""
    return sorted(_FAMILIES)
