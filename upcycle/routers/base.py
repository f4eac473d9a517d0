"""Router initialisations: the weight matrix [num_experts, hidden] of each MoE layer's gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..layer_data import LayerData

if TYPE_CHECKING:  # pragma: no cover
    from ..tensors import LayerExperts


@dataclass(frozen=True)
class RouterContext:
    """Inputs of a router init: sizes, virtual groups (experts of a group share a row) and a seeded generator."""

    layer: int
    hidden_size: int
    groups: list[int]
    generator: torch.Generator
    std: float
    data: Optional[LayerData] = None
    experts: Optional["LayerExperts"] = None


@dataclass(frozen=True)
class RouterInit:
    """``per_expert``: rows may differ inside a virtual group (breaks the exact split)."""

    name: str
    build: Callable[[RouterContext], torch.Tensor]
    description: str = ""
    needs_calibration: bool = False
    per_expert: bool = False


def scale_rows(rows: torch.Tensor, std: float) -> torch.Tensor:
    """Rows rescaled to the norm a N(0, std^2) row has (std * sqrt(hidden)), keeping their directions."""
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows / norms * (std * rows.shape[1] ** 0.5)


def expand_groups(rows: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """One router row per expert from one row per virtual group."""
    return rows[torch.tensor(groups, dtype=torch.long)].contiguous()
