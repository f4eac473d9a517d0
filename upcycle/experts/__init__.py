"""Expert methods, one small module each (``METHOD = ExpertMethod(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import RecipeError
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext

__all__ = ["ExpertMethod", "ExpertSlice", "LayerExperts", "MethodContext", "all_methods", "get_method"]


@lru_cache(maxsize=1)
def all_methods() -> dict[str, ExpertMethod]:
    import sys

    from ..registry import collect

    return collect(sys.modules[__name__], "METHOD")


def get_method(name: str) -> ExpertMethod:
    methods = all_methods()
    if name not in methods:
        raise RecipeError(f"unknown --method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]
