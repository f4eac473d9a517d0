"""Contiguous shards: neurons 0..f-1, f..2f-1, ... (Megatron's and He et al.'s default)."""

from .base import PartitionContext, SplitStrategy, contiguous_shards


def build(ctx: PartitionContext):
    return contiguous_shards(ctx.dense_size, ctx.shards)


PARTITION = SplitStrategy(name="contiguous", build=build, description="neurons in dense order, cut into equal blocks")
