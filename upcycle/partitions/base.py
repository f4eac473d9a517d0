"""A split strategy: how the F neurons of a dense FFN are cut into equal shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..layer_data import LayerData


@dataclass(frozen=True)
class PartitionContext:
    layer: int
    dense_size: int
    shards: int
    generator: torch.Generator
    data: Optional[LayerData] = None


@dataclass(frozen=True)
class SplitStrategy:
    """``build(ctx)`` returns ``ctx.shards`` index tensors of ``dense_size / shards`` neurons each."""

    name: str
    build: Callable[[PartitionContext], list[torch.Tensor]]
    needs_data: bool = False
    needs_calibration: bool = False
    description: str = ""


def contiguous_shards(dense_size: int, shards: int) -> list[torch.Tensor]:
    return list(torch.arange(dense_size).chunk(shards))


def shards_from_labels(labels: torch.Tensor, importance: torch.Tensor) -> list[torch.Tensor]:
    """Index tensors per cluster label, the clusters with the highest total ``importance`` first."""
    k = int(labels.max()) + 1
    score = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, importance.double())
    order = torch.argsort(score, descending=True, stable=True)
    return [(labels == int(c)).nonzero().flatten() for c in order]
