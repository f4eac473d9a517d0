"""The Python API mirrors the CLI: ``upcycle.convert``, ``upcycle.verify``, ``upcycle.inspect`` and ``Recipe``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import make_dense, max_logit_diff, read_json

import upcycle
from upcycle import Recipe
from upcycle.errors import RecipeError


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_dense("mistral", tmp_path_factory.mktemp("api") / "dense")


def test_convert_returns_a_result(tmp_path, dense):
    result = upcycle.convert(dense, tmp_path / "moe", num_experts=4, top_k=2, seed=1, quiet=True)
    assert isinstance(result, upcycle.ConversionResult)
    assert result.output == tmp_path / "moe" and result.dry_run is False
    assert result.recipe == Recipe(num_experts=4, top_k=2, seed=1)
    assert sorted(result.files) == sorted(p.name for p in (tmp_path / "moe").iterdir())
    s = result.summary
    assert (s["family"], s["target"], s["architecture"], s["exact"]) == ("mistral", "mixtral", "MixtralForCausalLM", True)
    assert s["num_experts"] == 4 and s["top_k"] == 2 and s["moe_layers"] == [0, 1, 2]
    assert s["output_bytes"] == (tmp_path / "moe" / "model.safetensors").stat().st_size
    assert max_logit_diff(dense, tmp_path / "moe") <= 1e-4
    # calling twice works (upcycle.convert stays the function after its module is imported)
    again = upcycle.convert(dense, tmp_path / "moe", num_experts=4, top_k=2, seed=1, quiet=True, force=True)
    assert again.summary == s


def test_convert_recipe_forms(tmp_path, dense):
    """A Recipe, a mapping or a file, with keyword overrides winning; the caller's Recipe is not changed."""
    recipe = Recipe(num_experts=6, top_k=3, router_init="zeros")
    from_obj = upcycle.convert(dense, tmp_path / "a", recipe, top_k=1, dry_run=True)
    assert from_obj.recipe == Recipe(num_experts=6, top_k=1, router_init="zeros") and recipe.top_k == 3
    from_dict = upcycle.convert(dense, tmp_path / "b", {"num_experts": 6, "top_k": 3}, dry_run=True)
    assert (from_dict.summary["num_experts"], from_dict.summary["top_k"]) == (6, 3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"num_experts": 2, "top_k": 1}))
    from_file = upcycle.convert(dense, tmp_path / "c", str(path), seed=9, dry_run=True)
    assert from_file.recipe == Recipe(num_experts=2, top_k=1, seed=9)
    assert from_file.output is None and from_file.files == [] and from_file.dry_run
    assert not any((tmp_path / n).exists() for n in "abc")


def test_none_overrides_are_ignored(tmp_path, dense):
    """The CLI passes unset flags as None; they must not clobber the recipe."""
    result = upcycle.convert(dense, tmp_path / "a", Recipe(num_experts=5, top_k=2), num_experts=None, top_k=None,
                             dry_run=True)
    assert result.recipe.num_experts == 5


def test_verify_and_inspect(tmp_path, dense):
    upcycle.convert(dense, tmp_path / "moe", num_experts=4, top_k=2, quiet=True)
    report = upcycle.verify(dense, tmp_path / "moe", max_new_tokens=3, quiet=True)
    assert isinstance(report, upcycle.VerifyReport)
    assert report.passed and report.exact_expected and report.max_abs_logit_diff <= 1e-4
    assert report.greedy_match == 1.0 and report.dtype == "float32" and report.atol == 1e-3
    assert set(report.to_dict()) >= {"max_abs_logit_diff", "mean_kl", "greedy_match", "exact_expected", "passed"}
    bf16 = upcycle.verify(dense, tmp_path / "moe", max_new_tokens=0, dtype="bfloat16", quiet=True)
    assert bf16.dtype == "bfloat16" and bf16.atol == 0.5 and bf16.passed
    with pytest.raises(RecipeError):
        upcycle.verify(dense, tmp_path / "moe", dtype="int8")

    info = upcycle.inspect(tmp_path / "moe")
    assert info["num_experts"] == 4 and info["top_k"] == 2 and info["architecture"] == "MixtralForCausalLM"
    assert info["recipe"] == Recipe(num_experts=4, top_k=2).to_dict()


def test_recipe_validation_and_round_trip(tmp_path):
    recipe = Recipe(num_experts=16, top_k=4, router_std=0.1, seed=3, dtype="bfloat16", max_shard_size="2GB",
                    revision="v1", noise_std=0.01)
    assert recipe.validate() is recipe
    split = Recipe.from_dict({"method": "split", "granularity": 4, "num_experts": 8, "top_k": 4})
    assert split.option("granularity") == 4 and Recipe.from_dict(split.to_dict()) == split
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict({**recipe.to_dict(), "upcycle": {"anything": 1}}) == recipe
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert Recipe.load(tmp_path / "r.json") == recipe
    import yaml

    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe.to_dict()))
    assert Recipe.load(tmp_path / "r.yml") == recipe
    assert Recipe() == Recipe(num_experts=8, top_k=2, method="replicate", target="auto", router_init="normal",
                              router_std=0.02, seed=0, dtype="auto", max_shard_size="5GB")

    for bad in (dict(num_experts=0), dict(top_k=0), dict(num_experts=2, top_k=3), dict(dtype="int4"),
                dict(router_std=-0.1), dict(method="nope"), dict(router_init="nope"), dict(max_shard_size="x"),
                dict(num_experts=2.5)):
        with pytest.raises(RecipeError):
            Recipe(**bad).validate()
    with pytest.raises(RecipeError, match="unknown recipe key"):
        Recipe.from_dict({"experts": 3})


def test_upcycle_recipe_json_is_a_recipe(tmp_path, dense):
    upcycle.convert(dense, tmp_path / "moe", num_experts=3, top_k=1, dtype="float16", quiet=True)
    written = read_json(tmp_path / "moe" / "upcycle_recipe.json")
    assert Recipe.load(tmp_path / "moe" / "upcycle_recipe.json") == Recipe(num_experts=3, top_k=1, dtype="float16")
    assert written["upcycle"]["versions"]["upcycle"] == upcycle.__version__


def test_parse_size():
    from upcycle.recipe import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5 kb") == 1500
    assert parse_size(1234) == parse_size("1234") == 1234
    for bad in ("", "GB", "five", "-1MB", 0):
        with pytest.raises(RecipeError):
            parse_size(bad)
