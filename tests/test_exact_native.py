"""Replicate into each native target is exact: plain AutoModelForCausalLM loads the native class,
and max |Δlogit| <= EXACT_ATOL (3.8e-6, docs/testing.md) at fp32 against the dense model."""

import pytest
from click.testing import CliRunner
from factories import EXACT_ATOL, make_dense, max_logit_diff, read_json

from upcycle.cli import cli

CASES = [
    ("llama", "MixtralForCausalLM", {}),
    ("mistral", "MixtralForCausalLM", {}),
    ("qwen2", "Qwen2MoeForCausalLM", {}),
    ("qwen2", "Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", "Qwen3MoeForCausalLM", {}),
    # one sliding window for every layer (qwen3_moe expresses that; mixed layers are refused)
    ("qwen3", "Qwen3MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
]


@pytest.mark.parametrize("family,cls,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("experts,top_k", [(4, 2), (3, 1)])
def test_replicate_is_exact(tmp_path, family, cls, overrides, experts, top_k):
    from transformers import AutoModelForCausalLM

    dense = make_dense(family, tmp_path / "dense", **overrides)
    out = tmp_path / "moe"
    result = CliRunner().invoke(cli, ["convert", str(dense), str(out), "-e", str(experts), "-k", str(top_k), "-q"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == cls
    assert read_json(out / "config.json")["architectures"] == [cls]
    assert max_logit_diff(dense, out) <= EXACT_ATOL
