"""Find plug-in modules by name: every module in a package that defines a given attribute."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
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
    if not isinstance(name, str) or name not in found:  # a recipe file can hold a list or a mapping here
        raise RecipeError(f"unknown {flag} {name!r}; available: {', '.join(sorted(found))}")
    return found[name]


# Reading plug-ins and defaults from source, without importing them (so that CLI help stays free of torch)

def _package_paths(package: str) -> list[str]:
    """The folders of ``package``, found without running its ``__init__``."""
    module = sys.modules.get(package)
    return list(module.__path__) if module is not None else \
        list(importlib.util.find_spec(package).submodule_search_locations or [])


def _parsed(path: str) -> ast.Module:
    """The syntax tree of a source file, parsed once per version of the file (one help screen reads some
    files for several options)."""
    return _parse(path, Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _parse(path: str, mtime_ns: int) -> ast.Module:
    return ast.parse(Path(path).read_text())


def declarations(package: str, attribute: str) -> dict[str, dict[str, Any]]:
    """``{name: {keyword: value}}`` of a package's plug-ins: the literal (str, bool, number) keywords of each
    ``ATTRIBUTE = X(name=..., ...)``, read from the source."""
    found: dict[str, dict[str, Any]] = {}
    for info in sorted(pkgutil.iter_modules(_package_paths(package)), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        tree = _parsed(str(Path(info.module_finder.path, f"{info.name}.py")))
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in node.targets)
                    and isinstance(node.value, ast.Call)):
                words = {k.arg: k.value.value for k in node.value.keywords if isinstance(k.value, ast.Constant)}
                if isinstance(words.get("name"), str):
                    found[words["name"]] = words
    return found


def describe(package: str, attribute: str) -> dict[str, str]:
    """``{name: description}`` of a package's plug-ins: the literal ``name=`` and ``description=`` of each
    ``ATTRIBUTE = X(...)``, read from the source."""
    return {name: words.get("description", "") if isinstance(words.get("description"), str) else ""
            for name, words in declarations(package, attribute).items()}


def field_default(module: str, cls: str, field: str) -> Any:
    """The literal default of dataclass field ``cls.field`` in ``module`` (``upcycle.recipe``), read from the
    source; LookupError when the class has no such field with a literal default."""
    package, _, leaf = module.rpartition(".")
    for folder in _package_paths(package):
        path = Path(folder, f"{leaf}.py")
        if not path.is_file():
            continue
        for node in _parsed(str(path)).body:
            if isinstance(node, ast.ClassDef) and node.name == cls:
                for item in node.body:
                    if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                            and item.target.id == field and isinstance(item.value, ast.Constant)):
                        return item.value.value
    raise LookupError(f"{module}.{cls} has no field {field!r} with a literal default")
