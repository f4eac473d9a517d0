"""Neuron partitions for ``--method split`` (``--split-strategy``), one small module each, found by name."""

from __future__ import annotations

from functools import lru_cache

from ..registry import collect, lookup
from .base import PartitionContext, SplitStrategy, contiguous_shards

__all__ = ["PartitionContext", "SplitStrategy", "all_partitions", "get_partition", "partition"]


@lru_cache(maxsize=1)
def all_partitions() -> dict[str, SplitStrategy]:
    return collect(__name__, "PARTITION")


def get_partition(name: str) -> SplitStrategy:
    return lookup(all_partitions(), name, "--split-strategy")


def partition(name: str, ctx: PartitionContext) -> list:
    """``ctx.shards`` sorted index tensors of equal size, most important first.

    Without data (a dry run plans shapes only) data-aware strategies return the contiguous layout,
    which has the same shapes.
    """
    strategy = get_partition(name)
    if strategy.needs_data and ctx.data is None:
        return contiguous_shards(ctx.dense_size, ctx.shards)
    return [s.sort().values for s in strategy.build(ctx)]
