"""Units behind the methods: layer selection and balanced / streaming k-means."""

import pytest
import torch

from upcycle.clustering import StreamingKMeans, balanced_kmeans
from upcycle.errors import RecipeError
from upcycle.layers import select_layers


@pytest.mark.parametrize("spec,layers", [
    ("all", [0, 1, 2, 3, 4, 5]), ("every:2", [1, 3, 5]), ("every:3", [2, 5]), ("0,2,5", [0, 2, 5]),
    ("4-5", [4, 5]), ("1-2,5", [1, 2, 5]), ([0, 3], [0, 3]),
])
def test_select_layers(spec, layers):
    assert select_layers(spec, 6) == layers


@pytest.mark.parametrize("spec", ["every:0", "3-1", "a", "every:7", "1,,2"])
def test_select_layers_rejects(spec):
    with pytest.raises(RecipeError):
        select_layers(spec, 6)


def _planted(points_per_cluster: int, k: int, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=gen) * 10
    labels = torch.arange(k).repeat_interleave(points_per_cluster)
    perm = torch.randperm(labels.numel(), generator=gen)
    labels = labels[perm]
    return centres[labels] + torch.randn(labels.numel(), dim, generator=gen) * 0.1, labels, centres


def test_balanced_kmeans_recovers_planted_equal_clusters():
    x, truth, _ = _planted(12, 4)
    found = balanced_kmeans(x, 4, torch.Generator().manual_seed(1))
    assert torch.bincount(found).tolist() == [12] * 4
    for c in range(4):  # each found cluster is exactly one planted cluster
        assert truth[found == c].unique().numel() == 1


def test_balanced_kmeans_keeps_sizes_equal_on_unbalanced_data():
    x = torch.cat([torch.randn(30, 4), torch.randn(6, 4) + 20])
    found = balanced_kmeans(x, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(found).tolist() == [12, 12, 12]


def test_streaming_kmeans_finds_planted_centres():
    x, _, centres = _planted(200, 3)
    km = StreamingKMeans(3, torch.Generator().manual_seed(0))
    for batch in x.split(50):
        km.update(batch)
    found = km.result()
    dist = torch.cdist(centres, found)
    assert float(dist.min(1).values.max()) < 0.5


def _planted_layer(groups: int = 4, per_group: int = 6, hidden: int = 16):
    """FFN weights whose neurons form ``groups`` planted groups (same direction within a group, shuffled)."""
    from upcycle.layer_data import LayerData

    x, truth, _ = _planted(per_group, groups, dim=3 * hidden, seed=2)
    weights = {"gate": x[:, :hidden], "up": x[:, hidden:2 * hidden], "down": x[:, 2 * hidden:].t()}
    energy = truth.float() + 1  # group 3 is the most active
    return LayerData(weight=weights.__getitem__, activation_sketch=x, activation_energy=energy), truth


@pytest.mark.parametrize("strategy", ["kmeans", "activation"])
def test_data_aware_partitions_recover_planted_groups(strategy):
    from upcycle.partitions import PartitionContext, partition

    data, truth = _planted_layer()
    shards = partition(strategy, PartitionContext(0, 24, 4, torch.Generator().manual_seed(0), data))
    assert sorted(torch.cat(shards).tolist()) == list(range(24))
    for shard in shards:
        assert shard.numel() == 6 and truth[shard].unique().numel() == 1
    if strategy == "activation":  # most active shard first: it becomes the shared expert
        assert [int(truth[s[0]]) for s in shards] == [3, 2, 1, 0]


def test_dry_run_partitions_have_the_real_shapes():
    from upcycle.partitions import PartitionContext, partition

    shards = partition("activation", PartitionContext(0, 24, 4, torch.Generator().manual_seed(0), None))
    assert [s.tolist() for s in shards] == [list(range(i, i + 6)) for i in range(0, 24, 6)]


def test_kmeans_partition_with_random_projection(monkeypatch):
    import upcycle.partitions.kmeans as kmeans_strategy
    from upcycle.partitions import PartitionContext, partition

    monkeypatch.setattr(kmeans_strategy, "PROJECTED_DIM", 8)  # planted features have 48 dimensions
    data, truth = _planted_layer()
    shards = partition("kmeans", PartitionContext(0, 24, 4, torch.Generator().manual_seed(0), data))
    for shard in shards:
        assert shard.numel() == 6 and truth[shard].unique().numel() == 1
