"""MoE export targets, one small module each (``TARGET = MoeTarget(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

from ..errors import UnsupportedArchitectureError
from ..families import DenseFamily
from .base import MoeTarget

__all__ = ["FALLBACK_TARGET", "MoeTarget", "all_targets", "choose_target"]

#: what ``--target auto`` picks when the family's native target is not exact for this model: the bundled
#: model, used automatically as soon as a target module of this name is registered and takes the family
FALLBACK_TARGET = "upcycle"


@lru_cache(maxsize=1)
def all_targets() -> dict[str, MoeTarget]:
    """Every registered target by name."""
    import sys

    from ..registry import collect

    return collect(sys.modules[__name__], "TARGET")


def native_reason(family: DenseFamily, config: dict[str, Any]) -> Optional[str]:
    """Why the family's native target cannot reproduce this model exactly, or None when it can."""
    if family.native_target is None:
        return f"no native transformers MoE architecture matches the {family.name!r} family"
    return all_targets()[family.native_target].explain(family.name, config)


def choose_target(requested: str, family: DenseFamily, config: dict[str, Any]) -> MoeTarget:
    """Resolve ``--target`` (``auto`` or a name) for a dense model; refuse with the reason if inexact."""
    targets = all_targets()
    if requested == "auto":
        reason = native_reason(family, config)
        if reason is None:
            return targets[family.native_target]
        fallback = targets.get(FALLBACK_TARGET)
        if fallback is not None and fallback.explain(family.name, config) is None:
            return fallback
        raise UnsupportedArchitectureError(f"no exact target for this {family.name} model: {reason}")
    if requested not in targets:
        raise UnsupportedArchitectureError(
            f"unknown target {requested!r}; available: auto, {', '.join(sorted(targets))}")
    target = targets[requested]
    reason = target.explain(family.name, config)
    if reason:
        raise UnsupportedArchitectureError(f"--target {requested} cannot reproduce this model exactly: {reason}")
    return target
