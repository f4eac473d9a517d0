"""``make_plan`` and ``ConversionPlan`` on tiny in-memory models, without writing a model: the exactness
decision, the summary the recipe records, and which tensors are planned under which names and dtypes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from factories import state_infos, tiny_dense

from upcycle.convert import build_recipe
from upcycle.errors import CorruptCheckpointError, RecipeError
from upcycle.io.safetensors_format import TensorInfo
from upcycle.plan import make_plan

_DENSE: dict[str, tuple] = {}


def dense(family: str):
    """(config, state dict, infos) of a tiny ``family`` model, made once."""
    if family not in _DENSE:
        model = tiny_dense(family)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        _DENSE[family] = (model.config, state, state_infos(state))
    return _DENSE[family]


def plan_for(family: str = "llama", infos=None, **recipe):
    config, _, stored = dense(family)
    return make_plan(config, stored if infos is None else infos, build_recipe(None, **recipe))


def names(plan) -> list[str]:
    return [t.spec.name for t in plan.tensors]


def test_summary_of_a_replicate_plan():
    """Every summary field against numbers counted from the dense model (llama: tied embeddings)."""
    _, state, _ = dense("llama")
    plan = plan_for(num_experts=4, top_k=2)
    mlp = sum(v.numel() for k, v in state.items() if ".mlp." in k)          # 3 layers x 3 x 96 x 64
    rest = sum(v.numel() for k, v in state.items() if ".mlp." not in k and k != "lm_head.weight")
    routed, routers = 4 * mlp, 3 * 4 * 64
    summary = plan.summary()
    bytes_ = summary.pop("output_bytes")
    assert summary == {
        "family": "llama", "target": "mixtral", "architecture": "MixtralForCausalLM", "method": "replicate",
        "exact": True, "num_layers": 3, "moe_layers": [0, 1, 2], "num_experts": 4, "top_k": 2,
        "dense_ffn_size": 96, "expert_size": 96, "shared_expert_size": 0, "dtype": "float32",
        "total_params": rest + routers + routed, "active_params": rest + routers + routed * 2 // 4, "shards": 1,
    }
    assert mlp == 3 * 3 * 96 * 64
    total_bytes = 4 * summary["total_params"]
    assert total_bytes < bytes_ < total_bytes + 64 * 1024  # data plus the safetensors header


def test_active_params_count_top_k_of_the_routed_experts():
    plan = plan_for(num_experts=6, top_k=3, method="split", granularity=3)
    routed = sum(t.spec.numel for t in plan.tensors if t.expert_of is not None)
    assert routed == 2 * 3 * 3 * 96 * 64  # six experts of 32 neurons: two copies of the FFN per layer
    assert plan.active_params == plan.total_params - routed + routed * 3 // 6
    assert {t.expert_of for t in plan.tensors if t.expert_of is not None} == {0, 1, 2}
    assert all(t.expert_of is None for t in plan.tensors if t.spec.name.endswith("gate.weight"))


def test_shards_follow_max_shard_size():
    plan = plan_for(num_experts=4, top_k=2, max_shard_size="200KB")
    shards = plan.shards()
    assert len(shards) == plan.summary()["shards"] > 1
    assert sorted(s.name for shard in shards for s in shard) == sorted(names(plan))


def test_tensor_list_router_first_then_experts_and_every_dense_tensor_once():
    _, state, _ = dense("llama")
    plan = plan_for(num_experts=4, top_k=2)
    got = names(plan)
    assert len(got) == len(set(got))
    for layer in range(3):
        first = got.index(f"model.layers.{layer}.block_sparse_moe.gate.weight")
        experts = [n for n in got if n.startswith(f"model.layers.{layer}.block_sparse_moe.experts.")]
        assert experts == got[first + 1:first + 1 + 12]  # 4 experts x 3 projections, right after the router
    copied = [k for k in state if ".mlp." not in k and k != "lm_head.weight"]  # tied: lm_head not written
    assert set(got) - set(copied) == {n for n in got if "block_sparse_moe" in n}
    assert set(copied) <= set(got) and "lm_head.weight" not in got
    router = plan.tensors[got.index("model.layers.1.block_sparse_moe.gate.weight")]
    assert router.spec.shape == (4, 64) and router.expert_of is None


def test_untied_lm_head_and_stale_buffers():
    config, state, infos = dense("mistral")   # not tied
    infos = {**infos, "model.layers.0.self_attn.rotary_emb.inv_freq": TensorInfo(Path("x"), torch.float32, (16,))}
    plan = make_plan(config, infos, build_recipe(None, num_experts=2, top_k=1))
    got = names(plan)
    assert "lm_head.weight" in got and not any("inv_freq" in n for n in got)


def test_layer_subset_copies_the_dense_layers_unchanged():
    _, state, _ = dense("qwen2")
    plan = plan_for("qwen2", num_experts=4, top_k=2, layers="1")
    assert plan.moe_layers == [1] and sorted(plan.layers) == [1] and plan.dense_layers == [0, 2]
    got = names(plan)
    for layer in (0, 2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.{proj}.weight"
            assert key in got and plan.tensors[got.index(key)].copy_of == key
    assert not any(n.startswith("model.layers.1.mlp.") and n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight"))
                   for n in got)
    assert "model.layers.1.mlp.gate.weight" in got


@pytest.mark.parametrize("recipe,exact", [
    (dict(), True),
    (dict(method="split", granularity=2), True),
    (dict(method="split", granularity=2, router_init="zeros"), True),
    (dict(method="drop", allow_inexact=True), False),
    (dict(noise_std=0.01, allow_inexact=True), False),
    (dict(method="split", granularity=2, top_k=1, allow_inexact=True), False),   # top-1 cuts each group
    (dict(method="split", granularity=2, router_init="centroid", allow_inexact=True), False),
])
def test_exactness_decision(recipe, exact):
    recipe = {"num_experts": 4, "top_k": 2, **recipe}
    plan = plan_for(**recipe)
    assert plan.exact is exact and plan.summary()["exact"] is exact


def test_a_target_that_does_not_renormalise_is_never_exact(monkeypatch):
    plan = plan_for(num_experts=4, top_k=2)
    plan.target = dataclasses.replace(plan.target, renormalises_top_k=False)
    assert plan.exact is False


def test_output_dtype_auto_follows_a_bf16_source():
    config, _, infos = dense("llama")
    bf16 = {k: dataclasses.replace(v, dtype=torch.bfloat16) for k, v in infos.items()}
    plan = make_plan(config, bf16, build_recipe(None, num_experts=2, top_k=1))
    assert plan.dtype_name == "bfloat16" and plan.dtype == torch.bfloat16
    assert {t.spec.dtype for t in plan.tensors} == {torch.bfloat16}


def test_output_dtype_auto_weighs_bytes_not_tensor_count():
    from upcycle.plan import _output_dtype

    recipe = build_recipe(None)
    infos = {"a": TensorInfo(Path("x"), torch.float16, (1000,)), "b": TensorInfo(Path("x"), torch.float32, (1,)),
             "c": TensorInfo(Path("x"), torch.float32, (1,)), "ids": TensorInfo(Path("x"), torch.int64, (10000,))}
    assert _output_dtype(recipe, infos) == "float16"
    assert _output_dtype(recipe, {"ids": infos["ids"]}) == "float32"
    assert _output_dtype(build_recipe(None, dtype="bfloat16"), infos) == "bfloat16"
    # three fp32 tensors of 400 bytes outweigh one fp16 tensor of 600: the sum counts, not the largest
    infos = {"h": TensorInfo(Path("x"), torch.float16, (300,)),
             **{f"s{i}": TensorInfo(Path("x"), torch.float32, (100,)) for i in range(3)}}
    assert _output_dtype(recipe, infos) == "float32"
    # a source dtype the output cannot take (float64) falls back to float32
    assert _output_dtype(recipe, {"d": TensorInfo(Path("x"), torch.float64, (10,))}) == "float32"


def test_explicit_dtype_casts_floats_and_keeps_integer_tensors():
    config, _, infos = dense("llama")
    infos = {**infos, "model.position_ids": TensorInfo(Path("x"), torch.int64, (1, 256))}
    plan = make_plan(config, infos, build_recipe(None, num_experts=2, top_k=1, dtype="float16"))
    dtypes = {t.spec.name: t.spec.dtype for t in plan.tensors}
    assert dtypes.pop("model.position_ids") == torch.int64
    assert set(dtypes.values()) == {torch.float16}


def test_missing_mlp_tensor_is_a_corrupt_checkpoint():
    config, _, infos = dense("llama")
    broken = {k: v for k, v in infos.items() if k != "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        make_plan(config, broken, build_recipe(None, num_experts=2, top_k=1))


def test_mlp_biases_need_a_target_that_holds_them():
    config, _, infos = dense("llama")
    biased = {**infos, "model.layers.1.mlp.down_proj.bias": TensorInfo(Path("x"), torch.float32, (64,))}
    cfg = {**config.to_dict()}  # the config does not say mlp_bias: only the tensor tells
    with pytest.raises(RecipeError, match=r"model\.layers\.1\.mlp\.down_proj\.bias.*target mixtral"):
        make_plan(cfg, biased, build_recipe(None, num_experts=2, top_k=1))
    plan = make_plan(cfg, biased, build_recipe(None, num_experts=2, top_k=1, target="upcycle"))
    assert "model.layers.1.mlp.experts.1.down_proj.bias" in names(plan)


def test_shared_expert_width():
    plan = plan_for("qwen2", num_experts=6, top_k=3, method="split", granularity=4, shared_experts=1)
    assert plan.shared_size == 24 and plan.summary()["shared_expert_size"] == 24
    assert type(plan.shared_size) is int   # written into config.json as a layer width
    assert plan.expert_size == 24
    assert plan_for("qwen2", num_experts=4, top_k=2).shared_size == 0


def test_shared_expert_width_from_layer_experts():
    """``upcycle merge`` hands planning its own experts, with a shared one: its width is the plan's."""
    from upcycle.tensors import ExpertSlice, LayerExperts

    config, _, infos = dense("llama")

    def experts(ctx):
        return LayerExperts([ExpertSlice() for _ in range(2)], [0, 1], shared=ExpertSlice(neurons=torch.arange(48)))

    plan = make_plan(config, infos, build_recipe(None, num_experts=2, top_k=1, target="upcycle"),
                     layer_experts=experts)
    assert plan.shared_size == 48

    def whole(ctx):   # a shared expert that is the whole FFN (no neuron list)
        return LayerExperts([ExpertSlice() for _ in range(2)], [0, 1], shared=ExpertSlice())

    plan = make_plan(config, infos, build_recipe(None, num_experts=2, top_k=1, target="upcycle"), layer_experts=whole)
    assert plan.shared_size == 96


def test_the_method_sees_its_layer_sizes_options_generator_and_data():
    """What ``make_plan`` hands each layer's expert method (here a recording one, as ``upcycle merge`` does)."""
    from upcycle.layer_data import LayerData
    from upcycle.tensors import ExpertSlice, LayerExperts, layer_generator

    config, _, infos = dense("llama")
    seen = {}
    stats = {layer: LayerData(weight=None, activation_energy=torch.full((96,), float(layer))) for layer in range(3)}

    def record(ctx):
        seen[ctx.layer] = (ctx, int(torch.randint(2**62, (1,), generator=ctx.generator)))
        return LayerExperts([ExpertSlice() for _ in range(3)], [0, 1, 2])

    recipe = build_recipe(None, num_experts=3, top_k=2, seed=9, target="upcycle")
    make_plan(config, infos, recipe, data=stats.__getitem__, layer_experts=record)
    assert sorted(seen) == [0, 1, 2]
    for layer, (ctx, draw) in seen.items():
        assert (ctx.dense_size, ctx.hidden_size, ctx.num_experts, ctx.top_k) == (96, 64, 3, 2)
        assert ctx.data is stats[layer] and ctx.options == recipe.method_options
        assert draw == int(torch.randint(2**62, (1,), generator=layer_generator(9, layer, 0)))  # stream 0


def test_noise_is_planned_per_expert_from_the_noise_stream():
    from upcycle.tensors import layer_generator

    plan = plan_for(num_experts=3, top_k=2, noise_std=0.01, seed=4, allow_inexact=True)
    for layer in range(3):
        gen = layer_generator(4, layer, 2)
        experts = plan.layers[layer].experts
        assert [e.noise_std for e in experts] == [0.01] * 3 and not plan.layers[layer].exact
        assert [e.seed for e in experts] == [int(torch.randint(2**62, (1,), generator=gen)) for _ in range(3)]


def test_targets_adjust_hook_runs_at_planning():
    """granitemoeshared gives its shared MLP half of a full-width FFN: every routed expert is planned at half."""
    plan = plan_for("granite", num_experts=2, top_k=1, target="granitemoeshared")
    assert [e.down_scale for layer in plan.layers.values() for e in layer.experts] == [0.5] * 6


def test_layer_subset_refused_by_a_target_without_dense_layers():
    from upcycle.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="cannot keep layers dense"):
        plan_for(num_experts=2, top_k=1, layers="1", target="mixtral")
    with pytest.raises(UnsupportedArchitectureError, match="--shared-experts: mixtral has no shared expert"):
        plan_for(num_experts=3, top_k=3, method="split", granularity=4, shared_experts=1, target="mixtral")


def test_config_without_model_type_or_tie_flag():
    from upcycle.errors import UnsupportedArchitectureError

    config, _, infos = dense("mistral")
    cfg = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings"}
    assert "lm_head.weight" in names(make_plan(cfg, infos, build_recipe(None, num_experts=2, top_k=1)))  # untied
    cfg.pop("model_type")
    with pytest.raises(UnsupportedArchitectureError):
        make_plan(cfg, infos, build_recipe(None, num_experts=2, top_k=1))


def test_fused_tensors_kept_for_the_bundled_target_only():
    """Phi-3 stores qkv_proj and gate_up_proj fused: the bundled model keeps them fused, once each;
    mixtral gets the split names."""
    _, state, _ = dense("phi3")
    bundled = names(plan_for("phi3", num_experts=2, top_k=1, target="upcycle", layers="1"))
    assert len(bundled) == len(set(bundled))
    assert "model.layers.0.self_attn.qkv_proj.weight" in bundled
    assert "model.layers.0.mlp.gate_up_proj.weight" in bundled       # a dense layer, as stored
    assert not any("q_proj" in n or ".mlp.gate_proj" in n for n in bundled)
    mixtral = names(plan_for("phi3", num_experts=2, top_k=1, target="mixtral"))
    assert "model.layers.0.self_attn.q_proj.weight" in mixtral and not any("qkv_proj" in n for n in mixtral)


def test_router_tensor_is_made_in_the_plan_dtype_per_layer_and_seed():
    from upcycle.tensors import SourceCache

    _, state, _ = dense("llama")

    def routers(**recipe):
        plan = plan_for(num_experts=4, top_k=2, router_std=0.5, **recipe)
        cache = SourceCache(state.__getitem__)
        return [plan.tensors[names(plan).index(f"model.layers.{i}.block_sparse_moe.gate.weight")].make(cache)
                for i in range(3)]

    first, again, other = routers(), routers(), routers(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])
    assert first[0].shape == (4, 64) and 0.3 < float(first[0].std()) < 0.7
    assert routers(dtype="bfloat16")[0].dtype == torch.bfloat16


def _router(plan, state, layer: int) -> torch.Tensor:
    from upcycle.tensors import SourceCache

    name = plan.target.layout.router_name(plan, layer)
    return plan.tensors[names(plan).index(name)].make(SourceCache(state.__getitem__))


def test_router_stream_is_the_documented_one():
    """The random router of layer L is drawn from stream 1 of (seed, L): the same recipe gives the same
    checkpoint across versions (stream 0 is the method's, 2 the noise's)."""
    from upcycle.routers import RouterContext, get_router_init
    from upcycle.tensors import layer_generator

    _, state, _ = dense("llama")
    plan = plan_for(num_experts=4, top_k=2, seed=5, router_std=0.1)
    for layer in (0, 2):
        ctx = RouterContext(layer, 64, plan.layers[layer].groups, layer_generator(5, layer, 1), 0.1,
                            experts=plan.layers[layer])
        assert torch.equal(_router(plan, state, layer), get_router_init("normal").build(ctx))


def test_centroid_router_reads_its_own_layer_and_experts():
    """Centroid rows point along the mean dense gate row of each expert's neurons, of that layer."""
    _, state, _ = dense("llama")
    plan = plan_for(num_experts=4, top_k=2, method="split", granularity=2, router_init="centroid",
                    allow_inexact=True)
    for layer in range(3):
        gate = state[f"model.layers.{layer}.mlp.gate_proj.weight"]
        rows = _router(plan, state, layer)
        for e, sl in enumerate(plan.layers[layer].experts):
            want = gate[sl.neurons].mean(0)
            assert float(torch.nn.functional.cosine_similarity(rows[e], want, dim=0)) > 0.9999, (layer, e)


def test_router_statistics_come_from_the_planning_data_and_weights_from_the_checkpoint():
    """With calibration statistics (``data``), the k-means router takes that layer's centroids, and a
    router that reads weights reads them from the checkpoint, not from the statistics."""
    from upcycle.layer_data import LayerData

    config, state, infos = dense("llama")
    centroids = {layer: torch.randn(4, 64, generator=torch.Generator().manual_seed(layer)) for layer in range(3)}

    def no_weights(proj):
        raise AssertionError("weights must come from the checkpoint")

    def data(layer):
        return LayerData(weight=no_weights, hidden_centroids=centroids[layer])

    plan = make_plan(config, infos, build_recipe(None, num_experts=4, top_k=2, router_init="kmeans", calibration="unread.txt"), data=data)
    for layer in range(3):
        rows = _router(plan, state, layer)
        cos = torch.nn.functional.cosine_similarity(rows, centroids[layer], dim=1)
        assert float(cos.min()) > 0.9999, layer
    plan = make_plan(config, infos, build_recipe(None, num_experts=4, top_k=2, method="split", granularity=2,
                                                 router_init="centroid", allow_inexact=True), data=data)
    assert _router(plan, state, 1).shape == (4, 64)
    plan = make_plan(config, infos, build_recipe(None, num_experts=4, top_k=2, router_init="kmeans", calibration="unread.txt"))
    with pytest.raises(ValueError, match="layer 1: hidden-state centroids"):
        _router(plan, state, 1)
