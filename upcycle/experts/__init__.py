"""Expert methods, one small module each (``METHOD = ExpertMethod(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache

from ..registry import collect, lookup
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext

__all__ = ["ExpertMethod", "ExpertSlice", "LayerExperts", "MethodContext", "all_methods", "get_method"]


@lru_cache(maxsize=1)
def all_methods() -> dict[str, ExpertMethod]:
    return collect(__name__, "METHOD")


def get_method(name: str) -> ExpertMethod:
    return lookup(all_methods(), name, "--method")
