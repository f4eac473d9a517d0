"""Router initialisations, one small module each (``ROUTER = RouterInit(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import RecipeError
from .base import RouterContext, RouterInit

__all__ = ["RouterContext", "RouterInit", "all_router_inits", "get_router_init"]


@lru_cache(maxsize=1)
def all_router_inits() -> dict[str, RouterInit]:
    import sys

    from ..registry import collect

    return collect(sys.modules[__name__], "ROUTER")


def get_router_init(name: str) -> RouterInit:
    inits = all_router_inits()
    if name not in inits:
        raise RecipeError(f"unknown --router-init {name!r}; available: {', '.join(sorted(inits))}")
    return inits[name]
