"""Expert methods: how one dense FFN becomes a set of experts, each with the options it owns.

A method is one module with ``METHOD = ExpertMethod(...)``. Its options are a small frozen dataclass
(subclass of :class:`MethodOptions`, peft-style): each field is a flat recipe key and a CLI flag
(``drop_ratio`` -> ``--drop-ratio``), and the class says what it checks and which data it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..errors import RecipeError
from ..layer_data import LayerData
from ..tensors import ExpertSlice, LayerExperts

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe

__all__ = ["ExpertMethod", "ExpertSlice", "LayerExperts", "MethodContext", "MethodOptions", "NoOptions"]


def require_integer(flag: str, value: object, minimum: int) -> None:
    """Raise :class:`RecipeError` unless ``value`` is an integer (not a bool) >= ``minimum``; ``flag`` names it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"--{flag} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MethodOptions:
    """The options one expert method owns. Subclasses add fields with defaults and override the hooks."""

    def check(self, recipe: "Recipe") -> None:
        """Raise :class:`~upcycle.errors.RecipeError` for values no model can satisfy (needs no model)."""

    def calibration_reasons(self) -> list[str]:
        """The options that read ``--calibration`` text (empty when none does)."""
        return []

    def needs_weights(self) -> bool:
        """True when the method reads the dense FFN matrices to decide its experts (not only to copy them)."""
        return False

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without options of its own."""


@dataclass(frozen=True)
class MethodContext:
    """What a method may look at: sizes, its options, a seeded generator and (at conversion time) layer data."""

    layer: int
    dense_size: int
    hidden_size: int
    num_experts: int
    top_k: int
    generator: torch.Generator
    options: MethodOptions = NoOptions()
    data: Optional[LayerData] = None


@dataclass(frozen=True)
class ExpertMethod:
    """A named expert construction. ``exact`` says whether it preserves the dense function."""

    name: str
    exact: bool
    build: Callable[[MethodContext], LayerExperts]
    description: str = ""
    options: type[MethodOptions] = NoOptions
