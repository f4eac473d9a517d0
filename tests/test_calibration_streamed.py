"""Calibration through the layer-streaming runner gives the statistics the whole-model pass gave (the
implementation it replaced, kept here as the reference): the same k-means centroids of the hidden states
entering each MoE layer's FFN and the same activation sketches, for gated, Conv1D and fused families,
layer subsets and a shorter last sequence; and it holds one layer at a time."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, make_dense

from upcycle.calibration import (BATCH_SIZE, SEQUENCE_LENGTH, SKETCH_DIM, CalibrationStats, LayerStats,
                                 _same_length, _update_sketch, collect_statistics)
from upcycle.clustering import StreamingKMeans
from upcycle.convert import build_recipe
from upcycle.io import open_source
from upcycle.plan import make_plan


def _reference_statistics(src, plan, ids, *, want_hidden, want_activations):
    """The whole-model implementation (upcycle 0.x): hooks on the FFNs during full forwards, batch by batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(**src.pretrained_kwargs(), dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    stats = CalibrationStats()
    sketch_gen = torch.Generator().manual_seed(plan.recipe.seed)
    projection, handles = {}, []
    for layer in plan.moe_layers:
        entry = stats.layers[layer] = LayerStats()
        down = plan.family.mlp_key(layer, "down")[: -len(".weight")]
        if want_hidden:
            rows = max(plan.layers[layer].groups) + 1
            entry.kmeans = StreamingKMeans(rows, torch.Generator().manual_seed(plan.recipe.seed * 7919 + layer))
            handles.append(modules[down.rsplit(".", 1)[0]].register_forward_pre_hook(
                lambda mod, args, entry=entry: entry.kmeans.update(args[0])))
        if want_activations:
            handles.append(modules[down].register_forward_pre_hook(
                lambda mod, args, entry=entry: _update_sketch(entry, args[0], projection["r"])))
    length = min(SEQUENCE_LENGTH, plan.family.max_positions(plan.dense_config) or SEQUENCE_LENGTH)
    sequences = list(ids.split(length))
    with torch.no_grad():
        for start in range(0, len(sequences), BATCH_SIZE):
            for group in _same_length(sequences[start:start + BATCH_SIZE]):
                projection["r"] = torch.randn(group.numel(), SKETCH_DIM, generator=sketch_gen)
                model(group)
    for handle in handles:
        handle.remove()
    return stats


CASES = [
    ("llama", {}, {}),
    ("gpt2", {}, {"layers": "0,2"}),  # Conv1D weights, n_positions 256, a layer subset
    ("phi3", {}, {}),  # fused gate_up_proj in the module, canonical names in the plan
    ("gemma2", {}, {"layers": "1"}),
]


@pytest.mark.parametrize("family,overrides,recipe", CASES, ids=[c[0] for c in CASES])
def test_streamed_statistics_equal_the_whole_model_pass(tmp_path, family, overrides, recipe, monkeypatch):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    src = open_source(str(dense))
    recipe = build_recipe(num_experts=4, top_k=2, method="split", granularity=2, split_strategy="activation",
                          router_init="kmeans", calibration="unused.txt", **recipe)
    plan = make_plan(src.load_config().to_dict(), src.infos, recipe)
    ids = torch.randint(0, VOCAB, (1300,), generator=torch.Generator().manual_seed(3))  # 2.5 sequences of 512
    want = _reference_statistics(src, plan, ids, want_hidden=True, want_activations=True)
    monkeypatch.setenv("UPCYCLE_MAX_RESIDENT_LAYERS", "1")
    got = collect_statistics(src, plan, ids, want_hidden=True, want_activations=True, quiet=True)
    assert sorted(got.layers) == sorted(want.layers) == list(plan.moe_layers)
    for layer in plan.moe_layers:
        torch.testing.assert_close(got.hidden_centroids(layer), want.hidden_centroids(layer), rtol=1e-5, atol=1e-6)
        for a, b in zip(got.activations(layer), want.activations(layer)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert got.layers[layer].tokens == want.layers[layer].tokens == ids.numel()
