"""Router inits as units: shapes, virtual groups, row norms, seeding and what each row is made of
(written to kill the mutants scripts/mutation.sh routers found surviving; docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from upcycle.errors import RecipeError
from upcycle.layer_data import LayerData
from upcycle.routers import RouterContext, get_router_init
from upcycle.routers.base import expand_groups, scale_rows
from upcycle.tensors import ExpertSlice, LayerExperts

HIDDEN = 2048
GROUPS = [0, 0, 1, 1, 2, 2]


def _ctx(seed: int = 0, std: float = 0.02, groups=GROUPS, hidden: int = HIDDEN, **kw) -> RouterContext:
    return RouterContext(layer=3, hidden_size=hidden, groups=list(groups), generator=torch.Generator().manual_seed(seed),
                         std=std, **kw)


def _shares_rows_within_groups(router: torch.Tensor, groups=GROUPS) -> bool:
    return all(torch.equal(router[i], router[j]) == (groups[i] == groups[j])
               for i in range(len(groups)) for j in range(len(groups)))


def test_normal_router_is_seeded_grouped_and_has_its_std():
    build = get_router_init("normal").build
    router = build(_ctx(seed=5))
    assert router.shape == (len(GROUPS), HIDDEN) and router.dtype == torch.float32
    assert _shares_rows_within_groups(router)
    assert torch.equal(router, build(_ctx(seed=5))) and not torch.equal(router, build(_ctx(seed=6)))
    assert abs(float(router.std()) / 0.02 - 1) < 0.05
    assert torch.allclose(build(_ctx(seed=5, std=0.5)), router / 0.02 * 0.5, rtol=1e-6, atol=0)


def test_scale_rows_gives_each_row_the_norm_of_a_normal_row_and_keeps_its_direction():
    rows = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1e-3, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scaled = scale_rows(rows, 0.5)
    target = 0.5 * 4 ** 0.5  # std * sqrt(hidden)
    assert torch.allclose(scaled.norm(dim=1), torch.full((3,), target))
    assert torch.allclose(scaled / target, rows / rows.norm(dim=1, keepdim=True))


def test_expand_groups_gives_each_expert_its_groups_row():
    rows = torch.arange(6.0).reshape(3, 2)
    assert expand_groups(rows, [2, 0, 0, 1]).tolist() == [[4.0, 5.0], [0.0, 1.0], [0.0, 1.0], [2.0, 3.0]]


def test_virtual_group_rows_are_orthogonal_scaled_and_shared():
    router = get_router_init("virtual-group").build(_ctx(seed=1, hidden=64))
    assert _shares_rows_within_groups(router)
    unique = router[[0, 2, 4]]
    gram = unique @ unique.t()
    norm2 = (0.02 * 64 ** 0.5) ** 2
    assert torch.allclose(gram, torch.eye(3) * norm2, atol=1e-6)


def test_virtual_group_router_is_seeded():
    build = get_router_init("virtual-group").build
    assert torch.equal(build(_ctx(seed=1, hidden=64)), build(_ctx(seed=1, hidden=64)))
    assert not torch.equal(build(_ctx(seed=1, hidden=64)), build(_ctx(seed=2, hidden=64)))


@pytest.mark.parametrize("hidden", [3, 2])
def test_virtual_group_rows_with_as_many_or_more_groups_than_dimensions(hidden):
    """As many groups as dimensions: still orthogonal (a square Q); more: random rows, still scaled."""
    router = get_router_init("virtual-group").build(_ctx(seed=1, hidden=hidden))
    unique = router[[0, 2, 4]]
    norm = 0.02 * hidden ** 0.5
    assert router.shape == (len(GROUPS), hidden) and _shares_rows_within_groups(router)
    assert torch.allclose(unique.norm(dim=1), torch.full((3,), norm))
    if hidden == 3:
        assert torch.allclose(unique @ unique.t(), torch.eye(3) * norm ** 2, atol=1e-6)


def test_zeros_router():
    router = get_router_init("zeros").build(_ctx())
    assert router.shape == (len(GROUPS), HIDDEN) and router.dtype == torch.float32 and not router.any()


def test_kmeans_router_uses_the_centroids_of_its_layer():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    router = get_router_init("kmeans").build(_ctx(hidden=2, data=LayerData(lambda p: None, hidden_centroids=centroids)))
    expected = centroids / centroids.norm(dim=1, keepdim=True) * (0.02 * 2 ** 0.5)
    assert torch.allclose(router, expected[GROUPS])
    with pytest.raises(ValueError, match="layer 3"):
        get_router_init("kmeans").build(_ctx(hidden=2, data=LayerData(lambda p: None, hidden_centroids=centroids[:2])))
    with pytest.raises(ValueError, match="were not collected"):
        get_router_init("kmeans").build(_ctx(hidden=2, data=None))


@pytest.mark.parametrize("projections", [("gate", "up", "down"), ("up", "down")])
def test_centroid_router_is_the_mean_input_row_of_each_experts_neurons(projections):
    """Row e: mean of the first input projection's rows (gate; up when not gated) over expert e's neurons
    (all of them for a whole-FFN expert), rescaled to the normal router's row norm."""
    weights = {"gate": torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
               "up": torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) + 5,
               "down": torch.randn(4, 6)}
    data = LayerData(lambda p: weights[p], projections=projections)
    experts = LayerExperts([ExpertSlice(torch.tensor([0, 1, 2])), ExpertSlice(torch.tensor([3, 4, 5])), ExpertSlice()],
                           groups=[0, 1, 2])
    router = get_router_init("centroid").build(_ctx(hidden=4, groups=[0, 1, 2], data=data, experts=experts))
    first = weights[projections[0]]
    means = torch.stack([first[:3].mean(0), first[3:].mean(0), first.mean(0)])
    assert torch.allclose(router, scale_rows(means, 0.02))


def test_unknown_router_init_names_the_flag_and_the_choices():
    with pytest.raises(RecipeError, match=r"unknown --router-init 'nope'; available: centroid, kmeans, normal"):
        get_router_init("nope")
