"""Families with an exact native MoE counterpart (GUIDE section 2): tiny random dense models with their
distinctive options on convert with the CLI, load with plain AutoModelForCausalLM as the native class,
and match the dense logits (max |Δ| <= 1e-4 at fp32); options that break exactness are refused."""


import pytest
import torch
from click.testing import CliRunner
from factories import make_dense, max_logit_diff, read_json
from safetensors import safe_open

from upcycle import inspect
from upcycle.cli import cli

# Phi-3 128k: longrope switches from short to long factors past original_max_position_embeddings (16 < 40)
LONGROPE = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                "long_factor": [2.0 + 0.3 * i for i in range(8)]}}
CASES = [
    ("olmo2", "FlexOlmoForCausalLM", {}),
    ("granite", "GraniteMoeForCausalLM", {}),
    ("phi3", "MixtralForCausalLM", {}),
    ("phi3", "MixtralForCausalLM", LONGROPE),
    ("ernie4_5", "Ernie4_5_MoeForCausalLM", {}),
    ("hunyuan_v1_dense", "HunYuanMoEV1ForCausalLM", {}),
    ("cohere2", "Cohere2MoeForCausalLM", {}),
]


def _convert(dense, out, *args, verify=False):
    """Convert with the CLI; the tests measure |Δlogit| themselves, so conversion-time verify is opt-in."""
    flag = "--verify" if verify else "--no-verify"
    return CliRunner().invoke(cli, ["convert", str(dense), str(out), "-e", "4", "-k", "2", "-q", flag, *args])


def _keys(folder):
    keys = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return keys


@pytest.mark.parametrize("family,cls,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_native_target_is_exact(tmp_path, family, cls, overrides):
    from transformers import AutoModelForCausalLM

    dense = make_dense(family, tmp_path / "dense", **overrides)
    result = _convert(dense, tmp_path / "moe", verify=True)
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "moe" / "upcycle_recipe.json")["upcycle"]["verification"]["passed"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(model).__name__ == cls
    assert read_json(tmp_path / "moe" / "config.json")["architectures"] == [cls]
    assert max_logit_diff(dense, tmp_path / "moe", seq_len=40) <= 1e-4
    # inspect reads the native layout (packed experts, moe_k/moe_topk) as the plan counted it
    info, planned = inspect(tmp_path / "moe"), read_json(tmp_path / "moe" / "upcycle_recipe.json")["upcycle"]
    assert (info["moe_layers"], info["num_experts"], info["top_k"]) == ([0, 1, 2], 4, 2)
    assert info["active_params"] == planned["active_params"] < info["total_params"] == planned["total_params"]


def test_granitemoe_packs_experts(tmp_path):
    """input_linear [E, 2F, H] holds gate rows then up rows; output_linear [E, H, F]."""
    dense = make_dense("granite", tmp_path / "dense")
    assert _convert(dense, tmp_path / "moe").exit_code == 0
    keys, dense_keys = _keys(tmp_path / "moe"), _keys(dense)
    assert keys["model.layers.1.block_sparse_moe.input_linear.weight"] == (4, 2 * 96, 64)
    assert keys["model.layers.1.block_sparse_moe.output_linear.weight"] == (4, 64, 96)
    assert not any(".mlp." in k for k in keys)
    assert set(dense_keys) - set(keys) == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(3)
                                           for p in ("gate", "up", "down")}


def test_phi3_fused_tensors_are_split(tmp_path):
    dense = make_dense("phi3", tmp_path / "dense")
    assert _convert(dense, tmp_path / "moe").exit_code == 0
    keys = _keys(tmp_path / "moe")
    head = 64 // 4
    assert keys["model.layers.0.self_attn.q_proj.weight"] == (4 * head, 64)
    assert keys["model.layers.0.self_attn.k_proj.weight"] == (2 * head, 64)
    assert keys["model.layers.0.self_attn.v_proj.weight"] == (2 * head, 64)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)


def test_granitemoeshared_on_request_is_exact(tmp_path):
    """An explicit --target granitemoeshared: half/half shared MLP, packed like the experts."""
    from transformers import AutoModelForCausalLM

    dense = make_dense("granite", tmp_path / "dense")
    result = _convert(dense, tmp_path / "moe", "--target", "granitemoeshared")
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "moe" / "config.json")["shared_intermediate_size"] == 96
    assert _keys(tmp_path / "moe")["model.layers.0.shared_mlp.input_linear.weight"] == (2 * 96, 64)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "moe")).__name__ == "GraniteMoeSharedForCausalLM"
    assert max_logit_diff(dense, tmp_path / "moe") <= 1e-4


QWEN3_MIXED = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}


def test_qwen3_with_mixed_sliding_layers_goes_to_dots1(tmp_path):
    """qwen3_moe has one window for all layers; dots1 copies layer_types, so auto takes it (exact)."""
    from transformers import AutoModelForCausalLM

    dense = make_dense("qwen3", tmp_path / "dense", **QWEN3_MIXED)
    assert "sliding_attention" in read_json(dense / "config.json")["layer_types"]
    refused = _convert(dense, tmp_path / "refused", "--target", "qwen3_moe")
    assert refused.exit_code == 2 and "mixes sliding-window" in refused.output
    result = _convert(dense, tmp_path / "moe")
    assert result.exit_code == 0, result.output
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "moe")).__name__ == "Dots1ForCausalLM"
    assert _keys(tmp_path / "moe")["model.layers.0.mlp.shared_experts.gate_proj.weight"] == (96, 64)
    assert max_logit_diff(dense, tmp_path / "moe") <= 1e-4


def test_hunyuan_shared_mlp_is_half_of_the_dense_ffn(tmp_path):
    dense = make_dense("hunyuan_v1_dense", tmp_path / "dense")
    assert _convert(dense, tmp_path / "moe").exit_code == 0
    with safe_open(dense / "model.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as f:
        shared = f.get_tensor("model.layers.0.mlp.shared_mlp.down_proj.weight")
        expert = f.get_tensor("model.layers.0.mlp.experts.3.down_proj.weight")
    torch.testing.assert_close(shared, down * 0.5)
    torch.testing.assert_close(expert, down * 0.5)


def _split_in_two(ctx):
    """A fine-grained split: 2 contiguous shards of the FFN, each twice (down scaled by 2), groups of 2."""
    from upcycle.experts import ExpertSlice, LayerExperts

    half = ctx.dense_size // 2
    shards = [ExpertSlice(torch.arange(s * half, (s + 1) * half), 2.0) for s in range(2)]
    return LayerExperts(experts=[shards[e % 2] for e in range(ctx.num_experts)],
                        groups=[e // 2 for e in range(ctx.num_experts)])


NARROW = [  # family, target, class, (config key, value), shared MLP key and shape
    ("hunyuan_v1_dense", "auto", "HunYuanMoEV1ForCausalLM", ("intermediate_size", 48),
     ("model.layers.2.mlp.shared_mlp.gate_proj.weight", (48, 64))),
    ("granite", "granitemoeshared", "GraniteMoeSharedForCausalLM", ("shared_intermediate_size", 0), None),
    ("qwen3", "dots1", "Dots1ForCausalLM", ("n_shared_experts", 1),
     ("model.layers.1.mlp.shared_experts.up_proj.weight", (48, 64))),
]


@pytest.mark.parametrize("family,target,cls,config,shared", NARROW, ids=[n[1] for n in NARROW])
def test_shared_mlp_with_narrow_experts_is_exact(tmp_path, monkeypatch, family, target, cls, config, shared):
    """Experts narrower than the dense FFN already sum to it: hunyuan's shared MLP (as wide as an expert)
    gets a zero down projection, granitemoeshared none at all."""
    import upcycle.experts
    from transformers import AutoModelForCausalLM

    from upcycle.experts import ExpertMethod

    methods = {**upcycle.experts.all_methods(), "split2": ExpertMethod("split2", True, _split_in_two)}
    monkeypatch.setattr(upcycle.experts, "all_methods", lambda: methods)
    dense = make_dense(family, tmp_path / "dense")
    result = _convert(dense, tmp_path / "moe", "--method", "split2", "--target", target)
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "moe" / "config.json")[config[0]] == config[1]
    keys = _keys(tmp_path / "moe")
    assert keys.get(shared[0]) == shared[1] if shared else not any("shared_mlp" in k for k in keys)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "moe")).__name__ == cls
    assert max_logit_diff(dense, tmp_path / "moe") <= 1e-4


REFUSALS = [
    ("phi3", {"partial_rotary_factor": 0.5}, "mixtral", "partial rotary"),
    ("granite", {"mlp_bias": True}, "granitemoe", "mlp_bias=true"),
    ("ernie4_5", {"use_bias": True}, "ernie4_5_moe", "use_bias=true"),
]


@pytest.mark.parametrize("family,overrides,target,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("requested", ["auto", "native"])
def test_inexact_options_are_refused(tmp_path, family, overrides, target, reason, requested):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    result = _convert(dense, tmp_path / "moe", "--target", target if requested == "native" else "auto")
    if requested == "auto":  # the bundled model takes what the native target refuses
        assert result.exit_code == 0, result.output
        assert read_json(tmp_path / "moe" / "config.json")["model_type"] == "upcycle_moe"
        return
    assert result.exit_code == 2, result.output
    assert reason in result.output and "Traceback" not in result.output
    assert not (tmp_path / "moe").exists()


def test_target_of_another_family_is_refused(tmp_path):
    dense = make_dense("olmo2", tmp_path / "dense")
    result = _convert(dense, tmp_path / "moe", "--target", "granitemoe")
    assert result.exit_code == 2
    assert "does not take the 'olmo2' family" in result.output


def test_auto_falls_back_to_the_bundled_target_once_registered(monkeypatch):
    import upcycle.targets as targets
    from upcycle.families import all_families

    registered = {k: v for k, v in targets.all_targets().items() if k != targets.FALLBACK_TARGET}
    monkeypatch.setattr(targets, "all_targets", lambda: registered)
    from upcycle.targets.base import BundledTarget

    mixtral = registered["mixtral"]
    bundled = BundledTarget(name=targets.FALLBACK_TARGET, config_class=mixtral.config_class, families=("phi3",),
                            layout=mixtral.layout, moe_config=mixtral.moe_config)
    phi3, partial = all_families()["phi3"], {"rope_parameters": {"partial_rotary_factor": 0.5}}
    with pytest.raises(targets.UnsupportedArchitectureError, match="partial rotary"):
        targets.choose_target("auto", phi3, partial)
    monkeypatch.setattr(targets, "all_targets", lambda: {**registered, bundled.name: bundled})
    assert targets.choose_target("auto", phi3, {}).name == "mixtral"
    assert targets.choose_target("auto", phi3, partial).name == targets.FALLBACK_TARGET
