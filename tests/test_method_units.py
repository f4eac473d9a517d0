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
