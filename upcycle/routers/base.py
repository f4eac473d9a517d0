"""Router initialisations: the weight matrix [num_experts, hidden] of each MoE layer's gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class RouterContext:
    """Inputs of a router init: sizes, virtual groups (experts of a group share a row) and a seeded generator."""

    layer: int
    hidden_size: int
    groups: list[int]
    generator: torch.Generator
    std: float


@dataclass(frozen=True)
class RouterInit:
    name: str
    build: Callable[[RouterContext], torch.Tensor]
    description: str = ""


def expand_groups(rows: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """One router row per expert from one row per virtual group."""
    return rows[torch.tensor(groups, dtype=torch.long)].contiguous()
