"""Register the bundled model with transformers' Auto classes on first use, without importing torch early.

``install()`` (run by ``import upcycle``) registers at once for the Auto modules transformers has already
imported, and otherwise adds a meta-path hook that registers right after transformers imports them:
the config when ``configuration_auto`` is loaded, the model when ``modeling_auto`` is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"


def _register(module_name: str) -> None:
    from . import modeling

    if module_name == _MODEL_AUTO:
        modeling.register_model()
    else:
        modeling.register_config()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' Auto modules so that registration follows their import."""

    def __init__(self) -> None:
        self.pending = {_CONFIG_AUTO, _MODEL_AUTO}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
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
            self.pending.discard(fullname)
            if not self.pending:
                _uninstall()
            _register(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


_HOOK = _RegisterAfterImport()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def _loaded(name: str) -> bool:
    """Imported and done executing (a module being imported is in sys.modules already)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def install() -> None:
    """Register now for the Auto modules already loaded, and on import for the others."""
    for name in (_CONFIG_AUTO, _MODEL_AUTO):
        if _loaded(name) and name in _HOOK.pending:
            _HOOK.pending.discard(name)
            _register(name)
    if _HOOK.pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
