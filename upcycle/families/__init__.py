"""Dense model families, one small module each (``FAMILY = DenseFamily(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache
import sys

from ..errors import UnsupportedArchitectureError
from ..registry import collect
from .base import PROJECTIONS, DenseFamily

__all__ = ["DenseFamily", "PROJECTIONS", "all_families", "family_for_model_type"]


@lru_cache(maxsize=1)
def all_families() -> dict[str, DenseFamily]:
    """Every registered family by name."""
    return collect(sys.modules[__name__], "FAMILY")


def family_for_model_type(model_type: str) -> DenseFamily:
    """The family that reads checkpoints of ``model_type``; a clear error lists the supported ones."""
    for family in all_families().values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in all_families().values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported dense families: {', '.join(supported)}"
    )
