"""MoE export targets, one small module each (``TARGET = MoeTarget(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..errors import UnsupportedArchitectureError
from ..families import DenseFamily
from .base import MoeTarget

__all__ = ["MoeTarget", "all_targets", "choose_target"]


@lru_cache(maxsize=1)
def all_targets() -> dict[str, MoeTarget]:
    """Every registered target by name."""
    import sys

    from ..registry import collect

    return collect(sys.modules[__name__], "TARGET")


def _native_inexact(targets: dict[str, MoeTarget], family: DenseFamily, config: dict[str, Any]) -> bool:
    native = targets.get(family.native_target or "")
    return native is None or native.explain(family.name, config) is not None


def choose_target(requested: str, family: DenseFamily, config: dict[str, Any]) -> MoeTarget:
    """Resolve ``--target`` (``auto`` or a name) for a dense model; refuse with the reason if inexact."""
    targets = all_targets()
    if requested == "auto":
        if "upcycle" in targets and _native_inexact(targets, family, config):
            return targets["upcycle"]  # the bundled model expresses every family exactly
        if family.native_target is None:
            raise UnsupportedArchitectureError(f"no MoE target can express the {family.name!r} family yet")
        target = targets[family.native_target]
        reason = target.explain(family.name, config)
        if reason:
            raise UnsupportedArchitectureError(
                f"no exact target for this {family.name} model: {reason}")
        return target
    if requested not in targets:
        raise UnsupportedArchitectureError(
            f"unknown target {requested!r}; available: auto, {', '.join(sorted(targets))}")
    target = targets[requested]
    reason = target.explain(family.name, config)
    if reason:
        raise UnsupportedArchitectureError(f"--target {requested} cannot reproduce this model exactly: {reason}")
    return target
