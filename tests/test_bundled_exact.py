"""The bundled target (``upcycle_moe``) reproduces every dense family exactly: max |Δlogit| <= EXACT_ATOL (3.8e-6, docs/testing.md) at fp32,
and greedy generation with the KV cache gives the dense model's tokens."""

import pytest
import torch
from click.testing import CliRunner
from factories import EXACT_ATOL, VOCAB, make_dense, max_logit_diff, read_json, save_tiny_tokenizer

from upcycle.cli import cli
from upcycle.inspection import inspect

CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("mistral", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", {}),
    ("gemma", {}),
    ("gemma2", {}),
    ("gemma3_text", {}),
    ("gpt2", {}),
    ("gpt_neox", {}),
    ("phi", {}),
    ("phi3", {"partial_rotary_factor": 0.5}),
    ("phi3", {}),
    ("stablelm", {}),
    ("starcoder2", {}),
    ("olmo", {}),
    ("olmo2", {}),
    ("granite", {}),
    ("cohere2", {}),
    ("ernie4_5", {"use_bias": True}),
    ("hunyuan_v1_dense", {}),
]


def _convert(dense, out, *args):
    result = CliRunner().invoke(cli, ["convert", str(dense), str(out), "-q", "--no-verify", *args])
    assert result.exit_code == 0, result.output
    return read_json(out / "config.json")


def _greedy(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                              min_new_tokens=10, use_cache=True, pad_token_id=0).tolist()


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bundled_is_exact(tmp_path, family, overrides):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    config = _convert(dense, tmp_path / "moe", "--target", "upcycle", "-e", "4", "-k", "2")
    assert config["architectures"] == ["UpcycleMoeForCausalLM"]
    assert config["text_config"]["model_type"] == read_json(dense / "config.json")["model_type"]
    assert max_logit_diff(dense, tmp_path / "moe") <= EXACT_ATOL
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    assert _greedy(dense, ids) == _greedy(tmp_path / "moe", ids)


@pytest.mark.parametrize("family,overrides", [("gpt2", {}), ("phi3", {"partial_rotary_factor": 0.5})])
def test_top1_with_three_experts_is_exact(tmp_path, family, overrides):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    config = _convert(dense, tmp_path / "moe", "--target", "upcycle", "-e", "3", "-k", "1")
    assert (config["num_experts"], config["num_experts_per_tok"]) == (3, 1)
    assert max_logit_diff(dense, tmp_path / "moe") <= EXACT_ATOL


@pytest.mark.parametrize("family,overrides,expected", [
    ("llama", {}, "MixtralForCausalLM"),
    ("llama", {"mlp_bias": True}, "UpcycleMoeForCausalLM"),
    ("phi3", {"partial_rotary_factor": 0.5}, "UpcycleMoeForCausalLM"),
    ("gpt2", {}, "UpcycleMoeForCausalLM"),
])
def test_auto_falls_back_to_bundled_when_no_native_target_is_exact(tmp_path, family, overrides, expected):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    config = _convert(dense, tmp_path / "moe", "-e", "2", "-k", "1")
    assert config["architectures"] == [expected]


def test_bundled_checkpoint_layout(tmp_path):
    """Dense keys unchanged; experts in nn.Linear orientation (GPT-2 Conv1D transposed) with biases."""
    from safetensors import safe_open

    dense = make_dense("gpt2", tmp_path / "dense")
    _convert(dense, tmp_path / "moe", "--target", "upcycle", "-e", "2", "-k", "1")
    assert {"configuration_upcycle_moe.py", "modeling_upcycle_moe.py"} <= {p.name for p in (tmp_path / "moe").iterdir()}
    assert read_json(tmp_path / "moe" / "config.json")["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_upcycle_moe.UpcycleMoeForCausalLM"
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as moe, \
            safe_open(str(dense / "model.safetensors"), "pt") as src:
        assert moe.get_tensor("transformer.h.1.attn.c_attn.weight").equal(src.get_tensor("transformer.h.1.attn.c_attn.weight"))
        assert moe.get_tensor("transformer.h.1.mlp.experts.1.up_proj.weight").equal(
            src.get_tensor("transformer.h.1.mlp.c_fc.weight").t())
        assert moe.get_tensor("transformer.h.1.mlp.experts.0.down_proj.bias").equal(
            src.get_tensor("transformer.h.1.mlp.c_proj.bias"))
        assert moe.get_tensor("transformer.h.1.mlp.router.weight").shape == (2, 64)
        assert "transformer.h.1.mlp.c_fc.weight" not in moe.keys()
    report = inspect(tmp_path / "moe")
    assert (report["num_layers"], report["moe_layers"], report["num_experts"]) == (3, [0, 1, 2], 2)
    assert report["active_params"] < report["total_params"]


METHOD_CASES = [
    ("gpt2", {}, ["--method", "split", "--granularity", "2", "-e", "4", "-k", "2"]),
    ("llama", {"mlp_bias": True}, ["--method", "split", "--granularity", "2", "-e", "6", "-k", "2",
                                   "--shared-experts", "1"]),
    ("phi3", {"partial_rotary_factor": 0.5}, ["--method", "split", "--granularity", "3", "-e", "6", "-k", "3",
                                              "--layers", "0,2"]),
    ("gpt_neox", {}, ["-e", "4", "-k", "2", "--layers", "1"]),
]


@pytest.mark.parametrize("family,overrides,args", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_exact_methods_and_layer_subsets_on_bundled(tmp_path, family, overrides, args):
    """Fine-grained split (biases, Conv1D), shared experts, MoE in some layers only (fused dense layers kept)."""
    dense = make_dense(family, tmp_path / "dense", **overrides)
    _convert(dense, tmp_path / "moe", "--target", "upcycle", *args)
    assert max_logit_diff(dense, tmp_path / "moe") <= EXACT_ATOL


DATA_AWARE = {
    "kmeans": ["--method", "split", "--granularity", "2", "--split-strategy", "kmeans"],
    "activation": ["--method", "split", "--granularity", "2", "--split-strategy", "activation", "--calibration"],
    "centroid": ["--router-init", "centroid"],
}


@pytest.mark.parametrize("family", ["gpt2", "phi"])  # gpt2: Conv1D weights, n_positions; phi: plain non-gated
@pytest.mark.parametrize("method", sorted(DATA_AWARE))
def test_data_aware_methods_on_non_gated_families(tmp_path, family, method):
    """Partitions and router inits that read the FFN see it in nn.Linear orientation, with only the
    projections it has (no gate), and calibration respects the family's position limit."""
    dense = make_dense(family, tmp_path / "dense")
    save_tiny_tokenizer(dense)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join("the a of to and in is it that was for on are as with" for _ in range(20)))
    args = DATA_AWARE[method] + ([str(text)] if method == "activation" else [])
    _convert(dense, tmp_path / "moe", "-e", "4", "-k", "2", *args)
    assert max_logit_diff(dense, tmp_path / "moe") <= EXACT_ATOL
