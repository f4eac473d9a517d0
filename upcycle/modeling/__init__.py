"""The bundled MoE model (``upcycle_moe``): config, model, and their registration with the Auto classes.

``import upcycle`` (and this package) arrange that ``UpcycleMoeConfig`` is registered with ``AutoConfig`` and
``UpcycleMoeForCausalLM`` with ``AutoModelForCausalLM`` as soon as transformers loads those Auto classes
(see :mod:`upcycle.auto_register`), so plain ``AutoModelForCausalLM.from_pretrained(path)`` works without
importing torch up front. The classes themselves are imported on first access.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

#: the self-contained files copied into every ``upcycle_moe`` checkpoint
REMOTE_CODE_FILES = ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py")
AUTO_MAP = {"AutoConfig": "configuration_upcycle_moe.UpcycleMoeConfig",
            "AutoModelForCausalLM": "modeling_upcycle_moe.UpcycleMoeForCausalLM"}

__all__ = ["UpcycleMoeConfig", "UpcycleMoeForCausalLM", "UpcycleMoeBlock", "UpcycleMoeExpert", "REMOTE_CODE_FILES",
           "AUTO_MAP", "remote_code_sources", "register_config", "register_model"]

if TYPE_CHECKING:  # pragma: no cover
    from .configuration_upcycle_moe import UpcycleMoeConfig
    from .modeling_upcycle_moe import UpcycleMoeBlock, UpcycleMoeExpert, UpcycleMoeForCausalLM

_LAZY = {"UpcycleMoeConfig": ".configuration_upcycle_moe", "UpcycleMoeForCausalLM": ".modeling_upcycle_moe",
         "UpcycleMoeBlock": ".modeling_upcycle_moe", "UpcycleMoeExpert": ".modeling_upcycle_moe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def remote_code_sources() -> dict[str, Path]:
    """File name -> path of the modeling files shipped with checkpoints."""
    here = Path(__file__).parent
    return {name: here / name for name in REMOTE_CODE_FILES}


def register_config() -> None:
    """Register ``UpcycleMoeConfig`` with ``AutoConfig`` (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration_upcycle_moe import UpcycleMoeConfig

    AutoConfig.register(UpcycleMoeConfig.model_type, UpcycleMoeConfig, exist_ok=True)


def register_model() -> None:
    """Register ``UpcycleMoeForCausalLM`` with ``AutoModelForCausalLM`` (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from .configuration_upcycle_moe import UpcycleMoeConfig
    from .modeling_upcycle_moe import UpcycleMoeForCausalLM

    register_config()
    AutoModelForCausalLM.register(UpcycleMoeConfig, UpcycleMoeForCausalLM, exist_ok=True)

