"""MoE export targets, one small module each (``TARGET = MoeTarget(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional
import sys

from ..errors import UnsupportedArchitectureError
from ..families import DenseFamily
from ..registry import collect
from .base import MoeTarget

__all__ = ["FALLBACK_TARGET", "MoeTarget", "all_targets", "auto_candidates", "choose_target"]

#: the last target ``--target auto`` tries (after the native ones): the bundled model, used automatically
#: as soon as a target module of this name is registered (``native=False``) and takes the family
FALLBACK_TARGET = "upcycle"


@lru_cache(maxsize=1)
def all_targets() -> dict[str, MoeTarget]:
    """Every registered target by name."""
    return collect(sys.modules[__name__], "TARGET")


def native_reason(family: DenseFamily, config: dict[str, Any]) -> Optional[str]:
    """Why the family's native target cannot reproduce this model exactly, or None when it can."""
    if family.native_target is None:
        return f"no native transformers MoE architecture matches the {family.name!r} family"
    return all_targets()[family.native_target].explain(family.name, config)


def auto_candidates(family: DenseFamily) -> list[MoeTarget]:
    """What ``--target auto`` tries, in order: the family's native target, the other native targets that
    take the family (e.g. dots1 for qwen3 with mixed sliding layers), then the bundled model."""
    targets = all_targets()
    native = [targets[family.native_target]] if family.native_target else []
    others = [t for name, t in sorted(targets.items())
              if t.native and family.name in t.families and name != family.native_target]
    bundled = [targets[FALLBACK_TARGET]] if FALLBACK_TARGET in targets else []
    return native + others + bundled


def choose_target(requested: str, family: DenseFamily, config: dict[str, Any], recipe: Any = None,
                  num_layers: Optional[int] = None) -> MoeTarget:
    """Resolve ``--target`` (``auto`` or a name) for a dense model and recipe; refuse with the reason if the
    target cannot reproduce the model exactly or cannot hold the recipe's layout."""

    def reason(target: MoeTarget) -> Optional[str]:
        why = target.explain(family.name, config)
        if why is None and recipe is not None and num_layers is not None:
            why = target.explain_recipe(recipe, num_layers)
        return why

    targets = all_targets()
    if requested == "auto":
        candidates = auto_candidates(family)
        for target in candidates:
            if reason(target) is None:
                return target
        why = native_reason(family, config) or (reason(candidates[0]) if candidates else None)
        raise UnsupportedArchitectureError(f"no exact target for this {family.name} model: {why}")
    if requested not in targets:
        raise UnsupportedArchitectureError(
            f"unknown target {requested!r}; available: auto, {', '.join(sorted(targets))}")
    target = targets[requested]
    why = reason(target)
    if why:
        raise UnsupportedArchitectureError(f"--target {requested} cannot reproduce this model exactly: {why}")
    return target
