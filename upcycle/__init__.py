"""upcycle: turn dense Hugging Face causal language models into Mixture-of-Experts models."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["Recipe", "convert", "verify", "inspect", "push", "merge", "ConversionResult", "VerifyReport",
           "MergeResult", "UpcycleError", "UpcycleMoeConfig", "UpcycleMoeForCausalLM"]

if TYPE_CHECKING:  # pragma: no cover
    from .convert import ConversionResult, convert
    from .errors import UpcycleError
    from .hub_push import push
    from .inspection import inspect
    from .merge import MergeResult, merge
    from .modeling import UpcycleMoeConfig, UpcycleMoeForCausalLM
    from .recipe import Recipe
    from .verify import VerifyReport, verify

_LAZY = {
    "Recipe": ".recipe", "convert": ".convert", "ConversionResult": ".convert", "verify": ".verify",
    "VerifyReport": ".verify", "inspect": ".inspection", "UpcycleError": ".errors", "push": ".hub_push",
    "UpcycleMoeConfig": ".modeling", "UpcycleMoeForCausalLM": ".modeling", "merge": ".merge", "MergeResult": ".merge",
}


class _Package(types.ModuleType):
    """Keeps ``upcycle.convert`` and ``upcycle.verify`` the API functions: importing the submodules of
    the same name would otherwise rebind those attributes to the modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, transformers) only when the API is first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")


from .auto_register import install as _install_auto_registration  # noqa: E402 - after _Package is in place

_install_auto_registration()
