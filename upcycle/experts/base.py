"""Expert methods: how one dense FFN becomes a set of experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..layer_data import LayerData

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe


@dataclass(frozen=True)
class ExpertSlice:
    """One expert as a view of the dense FFN: which neurons it keeps and how its down projection is scaled.

    ``neurons`` of None means every neuron in the dense order. ``reinit`` lists positions (within the
    expert) whose gate/up rows and down column are redrawn from the dense matrices' mean and std;
    ``noise_std`` adds Gaussian noise; both draw from a generator seeded with ``seed``.
    ``source`` names another checkpoint served by the reader (``upcycle merge``): the expert's FFN matrices
    are then read under ``f"{source}::{dense_key}"`` instead of the dense key.
    """

    neurons: Optional[torch.Tensor] = None
    down_scale: float = 1.0
    reinit: Optional[torch.Tensor] = None
    noise_std: float = 0.0
    seed: int = 0
    source: Optional[str] = None

    def key(self, dense_key: str) -> str:
        """The reader key of this expert's copy of ``dense_key`` (prefixed by ``source`` when set)."""
        return dense_key if self.source is None else f"{self.source}::{dense_key}"

    @property
    def is_copy(self) -> bool:
        """True when the expert is the dense matrix unchanged."""
        return self.neurons is None and self.down_scale == 1.0 and self.reinit is None and not self.noise_std

    def width(self, dense_size: int) -> int:
        return dense_size if self.neurons is None else int(self.neurons.numel())


@dataclass
class LayerExperts:
    """The experts of one MoE layer, plus the virtual group of each (experts of one group share a router row)."""

    experts: list[ExpertSlice]
    groups: list[int]
    shared: Optional[ExpertSlice] = None
    exact: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MethodContext:
    """What a method may look at: sizes, the recipe and a seeded generator for this layer."""

    layer: int
    dense_size: int
    hidden_size: int
    num_experts: int
    top_k: int
    generator: torch.Generator
    options: dict
    recipe: Optional["Recipe"] = None
    data: Optional[LayerData] = None


@dataclass(frozen=True)
class ExpertMethod:
    """A named expert construction. ``exact`` says whether it preserves the dense function."""

    name: str
    exact: bool
    build: Callable[[MethodContext], LayerExperts]
    description: str = ""
