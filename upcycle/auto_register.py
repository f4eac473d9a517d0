"""Register the bundled model with transformers' Auto classes on first use, without importing torch early.

``install()`` (run by ``import upcycle``) registers what it can at once and otherwise adds a meta-path
hook that retries after each relevant module finishes importing: the config is registered once
transformers' ``configuration_auto`` is loaded, the model once ``modeling_auto`` is, and never while one
of our own modeling modules is half-imported (registration imports them).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from . import modeling

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
_OUR_CONFIG = "upcycle.modeling.configuration_upcycle_moe"
_OUR_MODEL = "upcycle.modeling.modeling_upcycle_moe"
_WATCHED = (_CONFIG_AUTO, _MODEL_AUTO, _OUR_CONFIG, _OUR_MODEL)
_pending = {"config", "model"}


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _loaded(name: str) -> bool:
    """Imported and done executing (a module being imported is in sys.modules already)."""
    return name in sys.modules and not _initializing(name)


def _try_register() -> None:
    if _initializing(_OUR_CONFIG) or _initializing(_OUR_MODEL):
        return
    if "config" in _pending and _loaded(_CONFIG_AUTO):
        _pending.discard("config")
        modeling.register_config()
    if "model" in _pending and _loaded(_MODEL_AUTO):
        _pending.discard("model")
        modeling.register_model()
    if not _pending:
        _uninstall()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the watched modules so that a registration attempt follows their import."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            spec._initializing = False  # importlib clears it only after this returns
            _try_register()

        spec.loader.exec_module = exec_then_register
        return spec


_HOOK = _RegisterAfterImport()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register what can be registered now; hook the imports that will allow the rest."""
    if _HOOK not in sys.meta_path and _pending:
        sys.meta_path.insert(0, _HOOK)
    _try_register()
