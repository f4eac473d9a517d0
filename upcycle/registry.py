"""Find plug-in modules by name: every module in a package that defines a given attribute."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Any

from .errors import RecipeError


def collect(package: ModuleType | str, attribute: str) -> dict[str, Any]:
    """Import each module of ``package`` (a module or its name) and return ``{obj.name: obj}`` for its
    ``attribute``. Two modules declaring one name is an error at import, never a silent replacement."""
    if isinstance(package, str):
        package = sys.modules[package]
    found: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        obj = getattr(module, attribute, None)
        if obj is None:
            continue
        if obj.name in found:
            raise ImportError(f"two {attribute} plug-ins are named {obj.name!r}: {origin[obj.name]} and "
                              f"{module.__name__}; rename one")
        found[obj.name], origin[obj.name] = obj, module.__name__
    return found


def lookup(found: dict[str, Any], name: str, flag: str) -> Any:
    """``found[name]``, or a :class:`RecipeError` naming the flag and every available choice."""
    if name not in found:
        raise RecipeError(f"unknown {flag} {name!r}; available: {', '.join(sorted(found))}")
    return found[name]


def describe(package: str, attribute: str) -> dict[str, str]:
    """``{name: description}`` of a package's plug-ins, read from their source without importing them (so that
    CLI help stays free of torch): the literal ``name=`` and ``description=`` of each ``ATTRIBUTE = X(...)``."""
    import ast
    import importlib.util
    from pathlib import Path

    module = sys.modules.get(package)
    paths = list(module.__path__) if module is not None else \
        list(importlib.util.find_spec(package).submodule_search_locations or [])
    found: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(paths), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        tree = ast.parse(Path(info.module_finder.path, f"{info.name}.py").read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in node.targets)
                    and isinstance(node.value, ast.Call)):
                words = {k.arg: k.value.value for k in node.value.keywords
                         if isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)}
                if "name" in words:
                    found[words["name"]] = words.get("description", "")
    return found
