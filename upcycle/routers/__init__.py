"""Router initialisations, one small module each (``ROUTER = RouterInit(...)``), found by name."""

from __future__ import annotations

from functools import lru_cache

from ..registry import collect, lookup
from .base import RouterContext, RouterInit

__all__ = ["RouterContext", "RouterInit", "all_router_inits", "get_router_init"]


@lru_cache(maxsize=1)
def all_router_inits() -> dict[str, RouterInit]:
    return collect(__name__, "ROUTER")


def get_router_init(name: str) -> RouterInit:
    return lookup(all_router_inits(), name, "--router-init")
