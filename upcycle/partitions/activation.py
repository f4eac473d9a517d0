"""Activation clustering (MoEfication style): balanced k-means of the neurons' activation patterns.

Each neuron's pattern is its activation over the calibration tokens, held as a random-projection
sketch (see :mod:`upcycle.calibration`), L2-normalised, so neurons that fire together share a shard.
Shards with the highest mean squared activation come first (the shared experts, when requested).
"""

from ..clustering import balanced_kmeans
from .base import PartitionContext, SplitStrategy, shards_from_labels


def build(ctx: PartitionContext):
    sketch = ctx.data.activation_sketch
    if sketch is None:
        raise ValueError("activation statistics were not collected for this layer")
    features = sketch / sketch.norm(dim=1).clamp_min(1e-12).unsqueeze(1)
    labels = balanced_kmeans(features, ctx.shards, ctx.generator)
    return shards_from_labels(labels, ctx.data.activation_energy)


PARTITION = SplitStrategy(name="activation", build=build, needs_data=True, needs_calibration=True,
                          description="balanced k-means of the neurons' activation patterns on --calibration text")
