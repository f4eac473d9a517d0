"""Each target's exactness-relevant settings, fast: the plan's tensors are made in memory and loaded into the
target's transformers class (strict names), then compared with the dense model at EXACT_ATOL.

Shapes are chosen so that a wrong setting shows: a fine-grained split (different experts, groups of 3
selected whole only with top-k 3) catches a wrong expert count, top-k, expert order, packing order or
routing-weight normalisation; a carved-out shared expert catches a wrong shared-expert gate scale. The
target classes' own defaults (8 experts, top-2, ...) differ from the values used here."""

from __future__ import annotations

import pytest
import torch
from factories import EXACT_ATOL, convert_in_memory, logit_diff, state_infos, tiny_dense

from upcycle.errors import UnsupportedArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread")

#: (family, target) for every registered target but the bundled one, which follows
CASES = [("llama", "mixtral"), ("phi3", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe"),
         ("qwen3", "dots1"), ("granite", "granitemoe"), ("granite", "granitemoeshared"),
         ("ernie4_5", "ernie4_5_moe"), ("hunyuan_v1_dense", "hunyuan_v1_moe"), ("cohere2", "cohere2_moe"),
         ("olmo2", "flex_olmo"), ("llama", "upcycle"), ("phi3", "upcycle"), ("gpt2", "upcycle"),
         ("qwen2", "upcycle")]   # qwen2: attention biases but none in the MLP

_DENSE: dict[str, torch.nn.Module] = {}


def dense(family: str) -> torch.nn.Module:
    if family not in _DENSE:
        _DENSE[family] = tiny_dense(family)
    return _DENSE[family]


def test_every_target_is_covered():
    from upcycle.targets import all_targets

    assert {t for _, t in CASES} == set(all_targets())


@pytest.mark.parametrize("family,target", CASES)
def test_fine_grained_split_is_exact(tmp_path, family, target):
    """Six different experts of a third of the FFN, top-3: exact only when the target selects whole groups
    (the right top-k and expert order) and adds them with weights renormalised to one."""
    model = dense(family)
    plan, moe = convert_in_memory(model, tmp_path, target=target, method="split", granularity=3,
                                  num_experts=6, top_k=3)
    assert plan.target.name == target and plan.exact
    assert plan.expert_size == 32 and len(plan.layers[0].experts) == 6
    assert logit_diff(model, moe) <= EXACT_ATOL


@pytest.mark.parametrize("family,target", CASES)
def test_replicate_top1_is_exact(tmp_path, family, target):
    """Three copies of the FFN, top-1: the single selected expert's weight must be renormalised to one."""
    model = dense(family)
    plan, moe = convert_in_memory(model, tmp_path, target=target, num_experts=3, top_k=1)
    assert plan.exact
    assert logit_diff(model, moe) <= EXACT_ATOL


@pytest.mark.parametrize("family,target", [("qwen2", "qwen2_moe"), ("llama", "upcycle"), ("gpt2", "upcycle")])
def test_carved_out_shared_expert_is_exact(tmp_path, family, target):
    """A shared expert carved out of the FFN: qwen2_moe gates it with sigmoid(0) = 1/2 (so its down
    projection is doubled), the bundled model adds it ungated; with MLP biases (gpt2) the dense down bias
    goes to the routed experts only (their weights sum to one), the shared expert's is zero."""
    model = dense(family)
    plan, moe = convert_in_memory(model, tmp_path, target=target, method="split", granularity=4,
                                  shared_experts=1, num_experts=6, top_k=3)
    assert plan.exact and plan.shared_size == plan.dense_size // 4
    assert logit_diff(model, moe) <= EXACT_ATOL


def test_wrong_shared_gate_scale_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a shared expert scaled 1.0 behind qwen2_moe's 1/2 gate is not exact."""
    import dataclasses

    import upcycle.targets.qwen2_moe as qwen2_moe

    monkeypatch.setattr(qwen2_moe, "TARGET", dataclasses.replace(qwen2_moe.TARGET, shared_expert_scale=1.0))
    model = dense("qwen2")
    _, moe = convert_in_memory(model, tmp_path, target="qwen2_moe", method="split", granularity=4,
                               shared_experts=1, num_experts=6, top_k=3)
    assert logit_diff(model, moe) > 1e-3


@pytest.mark.parametrize("family,target", [("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe"),
                                           ("cohere2", "cohere2_moe"), ("llama", "upcycle")])
def test_layer_subset_is_exact(tmp_path, family, target):
    """--layers 1: the other layers stay dense MLPs (mlp_only_layers, mlp_layer_types, moe_layers)."""
    model = dense(family)
    plan, moe = convert_in_memory(model, tmp_path, target=target, layers="1", method="split", granularity=3,
                                  num_experts=6, top_k=3)
    assert plan.moe_layers == [1] and plan.dense_layers == [0, 2]
    assert logit_diff(model, moe) <= EXACT_ATOL


@pytest.mark.parametrize("family,target", [("llama", "mixtral"), ("granite", "granitemoe"), ("olmo2", "flex_olmo"),
                                           ("ernie4_5", "ernie4_5_moe"), ("hunyuan_v1_dense", "hunyuan_v1_moe")])
def test_targets_without_layer_subsets_refuse_them(family, target):
    from upcycle.convert import build_recipe
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    cfg = dense(family).config.to_dict()
    with pytest.raises(UnsupportedArchitectureError, match="cannot keep layers dense"):
        choose_target(target, family_for_model_type(cfg["model_type"]), cfg, build_recipe(None, layers="1"), 3)


@pytest.mark.parametrize("family,overrides,fragment", [
    ("llama", {"attention_bias": True}, "attention has biases"),
    ("llama", {"mlp_bias": True}, "MLP has biases"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention", "full_attention"],
               "use_sliding_window": True, "sliding_window": 4}, "mixes sliding-window"),
    ("ernie4_5", {"use_bias": True}, "use_bias"),
])
def test_auto_falls_back_when_the_native_target_is_not_exact(family, overrides, fragment):
    """A dense config the native target cannot reproduce: naming the target is refused with the reason,
    --target auto picks another exact target (the bundled model, or dots1 for mixed qwen3 layers)."""
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    fam = family_for_model_type(family)
    cfg = {**dense(family).config.to_dict(), **overrides}
    with pytest.raises(UnsupportedArchitectureError, match=fragment):
        choose_target(fam.native_target, fam, cfg)
    assert choose_target("auto", fam, cfg).name != fam.native_target


def test_partial_rotary_is_refused_by_native_targets():
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    fam = family_for_model_type("llama")
    base = dense("llama").config.to_dict()
    for cfg in ({**base, "partial_rotary_factor": 0.5},
                {**base, "rope_parameters": {**base["rope_parameters"], "partial_rotary_factor": 0.5}}):
        with pytest.raises(UnsupportedArchitectureError, match="partial rotary"):
            choose_target("mixtral", fam, cfg)
        assert choose_target("auto", fam, cfg).name == "upcycle"
    assert choose_target("auto", fam, {**base, "partial_rotary_factor": 1.0}).name == "mixtral"


def test_auto_picks_the_native_target_and_unknown_targets_are_refused():
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    for family in ("llama", "qwen2", "qwen3", "granite", "cohere2", "olmo2", "gpt2"):
        fam = family_for_model_type(family)
        cfg = dense(family).config.to_dict()
        assert choose_target("auto", fam, cfg).name == (fam.native_target or "upcycle")
    fam = family_for_model_type("llama")
    with pytest.raises(UnsupportedArchitectureError, match="unknown target 'nope'"):
        choose_target("nope", fam, dense("llama").config.to_dict())
    with pytest.raises(UnsupportedArchitectureError, match="does not take the 'llama' family"):
        choose_target("qwen2_moe", fam, dense("llama").config.to_dict())


#: settings each target must write itself (not leave to the config class's defaults, which a transformers
#: release may change): routing that renormalises top-k over one group, no scaling, every layer MoE, and no
#: router logits in the forward output (the trainer adds its own router losses)
EXPLICIT = {
    "mixtral": {"router_jitter_noise": 0.0},
    "qwen2_moe": {"norm_topk_prob": True, "decoder_sparse_step": 1, "intermediate_size": 96},
    "qwen3_moe": {"norm_topk_prob": True, "decoder_sparse_step": 1, "intermediate_size": 96},
    "dots1": {"n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
              "first_k_dense_replace": 0, "intermediate_size": 96},
    "ernie4_5_moe": {"moe_num_shared_experts": 0, "moe_layer_start_index": 0, "moe_layer_end_index": 2,
                     "moe_layer_interval": 1, "intermediate_size": 96},
    "cohere2_moe": {"num_shared_experts": 0, "expert_selection_fn": "softmax", "norm_topk_prob": True,
                    "prefix_dense_sliding_window_pattern": 0, "prefix_dense_intermediate_size": 96},
    "flex_olmo": {"norm_topk_prob": True},
    "granitemoe": {}, "granitemoeshared": {}, "hunyuan_v1_moe": {},
}


@pytest.mark.parametrize("family,target", [c for c in CASES if c[1] != "upcycle" and c[0] != "phi3"])
def test_exactness_settings_are_written_explicitly(family, target):
    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan

    model = dense(family)
    plan = make_plan(model.config, state_infos(model.state_dict()), build_recipe(None, target=target, num_experts=6,
                                                                                  top_k=3))
    written = plan.target.moe_config(plan)
    want = {**EXPLICIT[target], "output_router_logits": False}
    assert {k: written.get(k, "<absent>") for k in want} == want
    assert 6 in written.values() and 3 in written.values()   # expert count and top-k, under the class's names


def test_auto_candidates_in_order():
    from upcycle.families import family_for_model_type
    from upcycle.targets import auto_candidates

    def names(family):
        return [t.name for t in auto_candidates(family_for_model_type(family))]

    assert names("qwen3") == ["qwen3_moe", "dots1", "upcycle"]
    assert names("llama") == ["mixtral", "upcycle"]
    assert names("granite") == ["granitemoe", "granitemoeshared", "upcycle"]
    assert names("gpt2") == ["upcycle"]


def test_mixed_sliding_qwen3_goes_to_dots1():
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    cfg = {**dense("qwen3").config.to_dict(), "layer_types": ["sliding_attention", "full_attention", "full_attention"],
           "use_sliding_window": True, "sliding_window": 4}
    assert choose_target("auto", family_for_model_type("qwen3"), cfg).name == "dots1"


def test_native_reason():
    from upcycle.families import family_for_model_type
    from upcycle.targets import native_reason

    llama = family_for_model_type("llama")
    cfg = dense("llama").config.to_dict()
    assert native_reason(llama, cfg) is None
    assert "attention has biases" in native_reason(llama, {**cfg, "attention_bias": True})
    assert native_reason(family_for_model_type("gpt2"), {}) == \
        "no native transformers MoE architecture matches the 'gpt2' family"


def test_layout_descriptions():
    from upcycle.targets import all_targets

    targets = all_targets()
    assert targets["mixtral"].layout.describe() == "`model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`"
    assert targets["granitemoe"].layout.describe() == (
        "packed: `model.layers.N.block_sparse_moe.input_linear.weight` = gate + up of all experts; "
        "`model.layers.N.block_sparse_moe.output_linear.weight` = down of all experts")


def test_bundled_model_writes_its_code(tmp_path):
    """The bundled target's extra files are the self-contained modeling sources, byte for byte."""
    from upcycle.modeling import remote_code_sources
    from upcycle.targets import all_targets

    plan, _ = convert_in_memory(dense("llama"), tmp_path / "moe", target="upcycle", num_experts=2, top_k=1)
    out = tmp_path / "code"
    out.mkdir()
    written = all_targets()["upcycle"].write_extra_files(out, plan)
    sources = remote_code_sources()
    assert written == list(sources) and len(written) >= 2
    assert all((out / name).read_bytes() == sources[name].read_bytes() for name in written)
    assert all(t.write_extra_files(out, plan) == [] for name, t in all_targets().items() if name != "upcycle")


def test_packed_experts_count_as_routed():
    """granitemoe's packed [E, ...] tensors are the routed experts: active parameters count top-k of them."""
    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan

    model = dense("granite")
    plan = make_plan(model.config, state_infos(model.state_dict()), build_recipe(None, num_experts=4, top_k=1))
    packed = [t for t in plan.tensors if "_linear." in t.spec.name]
    assert len(packed) == 6 and all(t.expert_of == int(t.spec.name.split(".")[2]) for t in packed)
    routed = sum(t.spec.numel for t in packed)
    assert plan.active_params == plan.total_params - routed + routed // 4


@pytest.mark.parametrize("target,family,fragment", [
    ("hunyuan_v1_moe", "hunyuan_v1_dense", r"shared_mlp is as wide as one expert \(96\); the shared expert has 48"),
    ("dots1", "qwen3", r"dots1.s shared MLP is a multiple of the expert width \(96\); the shared expert has 48 neurons"),
])
def test_shared_slice_of_another_width_is_refused(target, family, fragment):
    """``upcycle merge`` may hand a target a shared slice that its config cannot express: refused, not
    written with the wrong width."""
    from upcycle.convert import build_recipe
    from upcycle.errors import RecipeError
    from upcycle.plan import make_plan
    from upcycle.tensors import ExpertSlice, LayerExperts

    def experts(ctx):
        return LayerExperts([ExpertSlice(), ExpertSlice()], [0, 1], shared=ExpertSlice(neurons=torch.arange(48)))

    model = dense(family)
    with pytest.raises(RecipeError, match=fragment):
        plan = make_plan(model.config, state_infos(model.state_dict()),
                         build_recipe(None, target=target, num_experts=2, top_k=1), layer_experts=experts)
        plan.target.build_config(plan)


def test_ernie_without_use_bias_key_is_taken():
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    cfg = {k: v for k, v in dense("ernie4_5").config.to_dict().items() if k != "use_bias"}
    assert choose_target("ernie4_5_moe", family_for_model_type("ernie4_5"), cfg).name == "ernie4_5_moe"


def test_bundled_experts_count_as_routed_and_keep_the_dropout():
    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan

    model = dense("gpt2")
    plan = make_plan(model.config, state_infos(model.state_dict()), build_recipe(None, num_experts=4, top_k=1))
    routed = [t for t in plan.tensors if ".experts." in t.spec.name]
    assert {t.spec.name.rsplit(".", 1)[1] for t in routed} == {"weight", "bias"}
    assert all(t.expert_of == int(t.spec.name.split(".")[2]) for t in routed)
    total = sum(t.spec.numel for t in routed)
    assert plan.active_params == plan.total_params - total + total // 4
    config = plan.target.build_config(plan)
    assert config.mlp_dropout == model.config.resid_pdrop == 0.1 and config.mlp_bias is True


def test_bundled_model_needs_one_shared_width():
    from upcycle.convert import build_recipe
    from upcycle.errors import RecipeError
    from upcycle.plan import make_plan
    from upcycle.tensors import ExpertSlice, LayerExperts

    def experts(ctx):   # a shared expert of 24 neurons in layer 0, of 48 elsewhere
        return LayerExperts([ExpertSlice(), ExpertSlice()], [0, 1],
                            shared=ExpertSlice(neurons=torch.arange(24 if ctx.layer == 0 else 48)))

    model = dense("llama")
    plan = make_plan(model.config, state_infos(model.state_dict()),
                     build_recipe(None, target="upcycle", num_experts=2, top_k=1), layer_experts=experts)
    with pytest.raises(RecipeError, match=r"^the upcycle target needs one shared-expert width, got \[24, 48\]$"):
        plan.target.build_config(plan)


def test_per_expert_tensors_count_as_routed():
    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan

    model = dense("llama")
    plan = make_plan(model.config, state_infos(model.state_dict()), build_recipe(None, num_experts=4, top_k=1))
    routed = [t for t in plan.tensors if ".experts." in t.spec.name]
    assert len(routed) == 3 * 4 * 3 and all(t.expert_of == int(t.spec.name.split(".")[2]) for t in routed)


def test_native_config_drops_the_dense_identity():
    """Keys that name the dense model, its code or its path must not reach the MoE's config: an ``auto_map``
    would load the dense remote code, a ``model_type`` the dense class."""
    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan

    model = dense("llama")
    cfg = {**model.config.to_dict(), "auto_map": {"AutoModelForCausalLM": "dense.Model"},
           "_name_or_path": "/home/someone/dense", "transformers_version": "0.0.1", "dtype": "bfloat16",
           "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    plan = make_plan(cfg, state_infos(model.state_dict()), build_recipe(None, num_experts=4, top_k=1,
                                                                         dtype="float32"))
    written = plan.target.build_config(plan).to_dict()
    assert written["model_type"] == "mixtral" and written["architectures"] == ["MixtralForCausalLM"]
    assert "auto_map" not in written and written.get("_name_or_path", "") != "/home/someone/dense"
    assert written.get("transformers_version") != "0.0.1" and written["dtype"] == "float32"
    assert "torch_dtype" not in written or written["torch_dtype"] == "float32"


def test_refusal_reasons_name_the_target_and_families():
    from upcycle.convert import build_recipe
    from upcycle.families import family_for_model_type
    from upcycle.targets import choose_target

    llama = family_for_model_type("llama")
    cfg = dense("llama").config.to_dict()
    with pytest.raises(UnsupportedArchitectureError, match=r"the dense MLP has biases \(mlp_bias=true\), which "
                                                           r"mixtral experts cannot hold$"):
        choose_target("mixtral", llama, {**cfg, "mlp_bias": True})
    # with a recipe too: the family check is not overridden by the layout check
    with pytest.raises(UnsupportedArchitectureError, match=r"does not take the 'llama' family \(it takes: qwen2\)$"):
        choose_target("qwen2_moe", llama, cfg, build_recipe(None), 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bundled_config_settings(family):
    from upcycle.convert import build_recipe
    from upcycle.families import family_for_model_type
    from upcycle.plan import make_plan

    model = dense(family)
    cfg = {**model.config.to_dict(), "resid_pdrop": 0.0} if family == "gpt2" else model.config.to_dict()
    plan = make_plan(cfg, state_infos(model.state_dict()), build_recipe(None, target="upcycle", num_experts=4,
                                                                         top_k=2, dtype="bfloat16"))
    config = plan.target.build_config(plan)
    assert config.architectures == ["UpcycleMoeForCausalLM"] and config.dtype == "bfloat16"
    assert config.norm_topk_prob is True and config.router_type == "softmax" and config.mlp_dropout == 0.0
    assert config.hidden_act == family_for_model_type(family).activation(cfg)
    assert config.tie_word_embeddings is bool(cfg.get("tie_word_embeddings"))
