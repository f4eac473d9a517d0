"""Find plug-in modules by name: every module in a package that defines a given attribute."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any


def collect(package: ModuleType, attribute: str) -> dict[str, Any]:
    """Import each module of ``package`` and return ``{obj.name: obj}`` for its ``attribute``."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        obj = getattr(module, attribute, None)
        if obj is not None:
            found[obj.name] = obj
    return found
