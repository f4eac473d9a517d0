"""Weight clustering (LLaMA-MoE style): balanced k-means of each neuron's weight vector.

Neuron i is described by its gate row, up row and down column, concatenated and L2-normalised, so
neurons that read and write similar directions share a shard. Shards with the largest weight norm
come first (they become the shared experts when ``--shared-experts`` is set).
"""

import torch

from ..clustering import balanced_kmeans
from .base import PartitionContext, SplitStrategy, shards_from_labels


def neuron_features(ctx: PartitionContext) -> torch.Tensor:
    weight = ctx.data.weight
    return torch.cat([weight("gate"), weight("up"), weight("down").t()], dim=1)


def build(ctx: PartitionContext):
    features = neuron_features(ctx)
    norms = features.norm(dim=1)
    labels = balanced_kmeans(features / norms.clamp_min(1e-12).unsqueeze(1), ctx.shards, ctx.generator)
    return shards_from_labels(labels, norms)


PARTITION = SplitStrategy(name="kmeans", build=build, needs_data=True,
                          description="balanced k-means of the neurons' weight vectors")
