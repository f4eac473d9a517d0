"""Expert methods as units: which neurons each expert keeps, its virtual group, its down-projection
scale, the exactness flag, seeding, and the option checks (written to kill the mutants
scripts/mutation.sh experts found surviving; docs/testing.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from upcycle.errors import RecipeError
from upcycle.experts import get_method
from upcycle.experts.base import ExpertSlice, LayerExperts, MethodContext
from upcycle.experts.drop import DropOptions
from upcycle.experts.noise import add_noise
from upcycle.experts.split import SplitOptions


def _ctx(options, num_experts=8, top_k=4, dense=12, seed=0) -> MethodContext:
    return MethodContext(layer=0, dense_size=dense, hidden_size=4, num_experts=num_experts, top_k=top_k,
                         generator=torch.Generator().manual_seed(seed), options=options)


def test_split_experts_are_shards_in_virtual_groups_with_scaled_down_projections():
    layer = get_method("split").build(_ctx(SplitOptions(granularity=4)))
    shards = [torch.arange(0, 3), torch.arange(3, 6), torch.arange(6, 9), torch.arange(9, 12)]
    assert len(layer.experts) == 8 and layer.groups == [0, 0, 0, 0, 1, 1, 1, 1]
    for e, sl in enumerate(layer.experts):
        assert torch.equal(sl.neurons, shards[e % 4]) and sl.down_scale == 4.0
    assert layer.shared is None and layer.exact is True


def test_split_with_a_shared_expert():
    layer = get_method("split").build(_ctx(SplitOptions(granularity=4, shared_experts=1), num_experts=6, top_k=3))
    assert torch.equal(layer.shared.neurons, torch.arange(0, 3))
    assert [sl.neurons.tolist() for sl in layer.experts[:3]] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert layer.groups == [0, 0, 0, 1, 1, 1] and all(sl.down_scale == 3.0 for sl in layer.experts)
    assert layer.exact is True


def test_split_is_inexact_when_top_k_cuts_a_group():
    assert get_method("split").build(_ctx(SplitOptions(granularity=4), top_k=2)).exact is False


def test_split_granularity_must_divide_the_ffn():
    with pytest.raises(RecipeError, match=r"--granularity 5 does not divide the FFN width 12 .*divisors: 1, 2, 3, 4, 6, 12$"):
        get_method("split").build(_ctx(SplitOptions(granularity=5)))


def _recipe(**kw):
    base = dict(num_experts=8, top_k=4, allow_inexact=False, router_init="normal")
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("options,recipe,message", [
    (SplitOptions(granularity=0), _recipe(), r"^--granularity must be an integer >= 1, got 0$"),
    (SplitOptions(granularity=True), _recipe(), r"^--granularity must be an integer >= 1, got True$"),
    (SplitOptions(granularity=2, shared_experts=-1), _recipe(), r"^--shared-experts must be an integer >= 0, got -1$"),
    (SplitOptions(granularity=2, shared_experts=2), _recipe(),
     r"^--shared-experts 2 must be smaller than --granularity 2: the FFN is cut into 2 segments, 2 of them shared"),
    (SplitOptions(granularity=4, shared_experts=1), _recipe(num_experts=8),
     r"^--num-experts 8 must be a multiple of the routed segments per virtual group \(granularity 4 - 1 shared = 3\); "
     r"e\.g\. 6$"),
    (SplitOptions(granularity=4), _recipe(top_k=2),
     r"^--top-k 2 must be a multiple of the routed segments per virtual group \(granularity 4 = 4\) for the split "
     r"to be exact \(top-k then picks whole virtual groups\); use --top-k 4, or pass --allow-inexact to accept a "
     r"model that deviates from the dense one$"),
    (SplitOptions(granularity=4), _recipe(top_k=6), r"use --top-k 4, or pass"),
    (SplitOptions(granularity=4, shared_experts=1), _recipe(num_experts=4), r"; e\.g\. 3$"),
    (SplitOptions(granularity=2), _recipe(router_init="centroid"),
     r"^--router-init centroid gives each expert its own router row, which breaks the exact virtual-group split "
     r"\(experts of a group must share a row\); use kmeans, normal, virtual-group or zeros, or pass --allow-inexact$"),
])
def test_split_options_refuse_with_one_clear_message(options, recipe, message):
    with pytest.raises(RecipeError, match=message):
        options.check(recipe)


def test_split_refusal_names_the_registered_shared_row_routers(monkeypatch):
    """The routers suggested instead of a per-expert one come from the registry, so a new plug-in shows up."""
    import upcycle.experts.split as split
    from upcycle.routers import RouterInit, all_router_inits

    found = {**all_router_inits(), "zz-shared": RouterInit(name="zz-shared", build=None),
             "aa-own": RouterInit(name="aa-own", build=None, per_expert=True)}  # per-expert: not suggested
    monkeypatch.setattr(split, "all_router_inits", lambda: found)
    with pytest.raises(RecipeError, match=r"; use kmeans, normal, virtual-group, zeros or zz-shared, or pass"):
        SplitOptions(granularity=2).check(_recipe(router_init="centroid"))


@pytest.mark.parametrize("options,recipe", [
    (SplitOptions(granularity=4), _recipe(top_k=2, allow_inexact=True)),
    (SplitOptions(granularity=2), _recipe(router_init="centroid", allow_inexact=True)),
    (SplitOptions(granularity=1), _recipe(router_init="centroid")),  # groups of one: any router is exact
    (SplitOptions(granularity=4, shared_experts=2), _recipe(num_experts=8, top_k=2)),
])
def test_split_options_accept(options, recipe):
    options.check(recipe)


def test_split_options_know_what_data_their_strategy_needs():
    assert SplitOptions(split_strategy="activation").calibration_reasons() == ["--split-strategy activation"]
    assert SplitOptions(split_strategy="kmeans").calibration_reasons() == []
    assert SplitOptions(split_strategy="kmeans").needs_weights() is True
    assert SplitOptions(split_strategy="contiguous").needs_weights() is False
    assert DropOptions().needs_weights() is False  # replicate-like methods read no weights while planning


def test_split_random_strategy_follows_the_seed():
    build = get_method("split").build
    shards = [[sl.neurons.tolist() for sl in build(_ctx(SplitOptions(granularity=4, split_strategy="random"), seed=s)).experts]
              for s in (1, 1, 2)]
    assert shards[0] == shards[1] and shards[0] != shards[2]
    assert sorted(sum(shards[0][:4], [])) == list(range(12))


def test_drop_redraws_its_ratio_of_neurons_differently_per_expert():
    layer = get_method("drop").build(_ctx(DropOptions(drop_ratio=0.25), num_experts=4, top_k=2, dense=40))
    assert layer.groups == [0, 1, 2, 3] and layer.exact is False
    drawn = [sl.reinit for sl in layer.experts]
    assert all(d.numel() == 10 and torch.equal(d, d.sort().values) and d.unique().numel() == 10 for d in drawn)
    assert len({tuple(d.tolist()) for d in drawn}) == 4 and len({sl.seed for sl in layer.experts}) == 4
    again = get_method("drop").build(_ctx(DropOptions(drop_ratio=0.25), num_experts=4, top_k=2, dense=40))
    assert [sl.seed for sl in again.experts] == [sl.seed for sl in layer.experts]
    assert all(torch.equal(a.reinit, b.reinit) for a, b in zip(again.experts, layer.experts))
    assert min(sl.seed for sl in layer.experts) > 2**20  # seeds drawn from [0, 2**62)
    assert get_method("drop").build(_ctx(DropOptions(drop_ratio=0.0), num_experts=2, top_k=1)).exact is True


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, 1])
def test_drop_ratio_bounds_are_accepted(ratio):
    DropOptions(drop_ratio=ratio).check(_recipe())


@pytest.mark.parametrize("ratio", [-0.1, 1.5, True, "0.5"])
def test_drop_ratio_is_checked(ratio):
    with pytest.raises(RecipeError, match=r"^--drop-ratio must be between 0 and 1, got "):
        DropOptions(drop_ratio=ratio).check(_recipe())


def test_noise_gives_each_expert_its_own_seed_and_makes_the_layer_inexact():
    layer = LayerExperts([ExpertSlice(), ExpertSlice(), ExpertSlice(seed=7)], groups=[0, 1, 2])
    assert add_noise(layer, 0.0, torch.Generator().manual_seed(0)) is layer
    noisy = add_noise(layer, 0.01, torch.Generator().manual_seed(0))
    assert noisy.exact is False and all(sl.noise_std == 0.01 for sl in noisy.experts)
    seeds = [sl.seed for sl in noisy.experts]
    assert seeds[2] == 7 and seeds[0] != seeds[1] and min(seeds[:2]) > 2**20  # drawn from [0, 2**62)
    assert [sl.seed for sl in add_noise(layer, 0.01, torch.Generator().manual_seed(0)).experts] == seeds


def test_unknown_method_names_the_flag():
    with pytest.raises(RecipeError, match=r"^unknown --method 'nope'; available: drop, replicate, split"):
        get_method("nope")


def test_split_hands_the_layer_data_to_its_strategy():
    """Without the data, a data-aware strategy falls back to the dry-run (contiguous) cut: still exact,
    silently not what was asked for."""
    from test_method_units import _planted_layer

    data, truth = _planted_layer()
    ctx = MethodContext(layer=0, dense_size=24, hidden_size=16, num_experts=4, top_k=4,
                        generator=torch.Generator().manual_seed(0), options=SplitOptions(granularity=4, split_strategy="activation"),
                        data=data)
    layer = get_method("split").build(ctx)
    assert all(truth[sl.neurons].unique().numel() == 1 for sl in layer.experts)
    assert sorted(torch.cat([sl.neurons for sl in layer.experts]).tolist()) == list(range(24))
