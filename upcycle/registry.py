"""Find plug-in modules by name: every module in a package that defines a given attribute."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Any


def collect(package: ModuleType | str, attribute: str) -> dict[str, Any]:
    """Import each module of ``package`` (a module or its name) and return ``{obj.name: obj}`` for its
    ``attribute``."""
    if isinstance(package, str):
        package = sys.modules[package]
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        obj = getattr(module, attribute, None)
        if obj is not None:
            found[obj.name] = obj
    return found


def lookup(found: dict[str, Any], name: str, flag: str) -> Any:
    """``found[name]``, or a :class:`RecipeError` naming the flag and every available choice."""
    from .errors import RecipeError

    if name not in found:
        raise RecipeError(f"unknown {flag} {name!r}; available: {', '.join(sorted(found))}")
    return found[name]
