"""Expert methods, one small module each (``METHOD = ExpertMethod(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache

from ..registry import collect, lookup
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext, MethodOptions, NoOptions

__all__ = ["ExpertMethod", "ExpertSlice", "LayerExperts", "MethodContext", "MethodOptions", "NoOptions",
           "all_methods", "get_method", "option_owners"]


@lru_cache(maxsize=1)
def all_methods() -> dict[str, ExpertMethod]:
    return collect(__name__, "METHOD")


def get_method(name: str) -> ExpertMethod:
    return lookup(all_methods(), name, "--method")


def option_owners() -> dict[str, ExpertMethod]:
    """Every method option's name -> the method that owns it (two methods may not declare one name)."""
    owners: dict[str, ExpertMethod] = {}
    for method in all_methods().values():
        for name in method.options.fields():
            if name in owners:
                raise ValueError(f"option {name!r} is declared by methods {owners[name].name!r} and {method.name!r}")
            owners[name] = method
    return owners
