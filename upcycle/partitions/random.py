"""Random shards: a seeded random permutation of the neurons cut into equal blocks."""

import torch

from .base import PartitionContext, SplitStrategy


def build(ctx: PartitionContext):
    return list(torch.randperm(ctx.dense_size, generator=ctx.generator).chunk(ctx.shards))


PARTITION = SplitStrategy(name="random", build=build, description="seeded random equal-size shards")
