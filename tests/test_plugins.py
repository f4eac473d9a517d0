"""The plug-in shape the restructure promises: a new expert method with one option (the one
docs/adding-architectures.md prints) is one module, found by name, reachable from the CLI (``--method``,
``-o``) and recipe files; duplicate names fail at import."""

import json
from pathlib import Path

import pytest

import upcycle.experts
from checks import run_cli
from factories import EXACT_ATOL, make_dense, max_logit_diff
from upcycle.errors import RecipeError
from upcycle.recipe import Recipe
from upcycle.registry import collect

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_module() -> str:
    """The expert method that docs/adding-architectures.md walks through, exactly as printed there: the test
    runs the documented module, so the walk-through cannot drift from what works."""
    text = (ROOT / "docs" / "adding-architectures.md").read_text()
    section = text.split("\n## An expert method", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def scaled_method(tmp_path, monkeypatch):
    """Drop the module into the experts package (as a new file in upcycle/experts/ would be) and rescan."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scaled.py").write_text(walkthrough_module())
    monkeypatch.setattr(upcycle.experts, "__path__", [*upcycle.experts.__path__, str(folder)])
    upcycle.experts.all_methods.cache_clear()
    yield
    upcycle.experts.all_methods.cache_clear()


def test_new_method_with_one_option_is_one_module(tmp_path, scaled_method):
    dense = make_dense("llama", tmp_path / "dense")
    exact = tmp_path / "exact"
    result = run_cli("convert", str(dense), str(exact), "--method", "scaled", "-e", "2", "-k", "1", "-q")
    assert result.exit_code == 0, result.output
    assert max_logit_diff(dense, exact) <= EXACT_ATOL
    recipe = json.loads((exact / "upcycle_recipe.json").read_text())
    assert recipe["method"] == "scaled" and recipe["scale"] == 1.0

    scaled = tmp_path / "scaled"
    result = run_cli("convert", str(dense), str(scaled), "--method", "scaled", "-o", "scale=0.5", "-e", "2", "-k", "1",
                     "-q", "--allow-inexact", "--no-verify")
    assert result.exit_code == 0, result.output
    assert max_logit_diff(dense, scaled) > 1e-3  # the option reached the experts
    assert Recipe.load(scaled / "upcycle_recipe.json").option("scale") == 0.5

    bad = run_cli("convert", str(dense), str(tmp_path / "bad"), "--method", "scaled", "-o", "scale=3")
    assert bad.exit_code == 2 and "--scale must be in (0, 2]" in bad.output
    other = run_cli("convert", str(dense), str(tmp_path / "other"), "-o", "scale=0.5")
    assert other.exit_code == 2 and "--scale need --method scaled" in other.output
    assert "scaled (copies with a scaled down projection)" in " ".join(run_cli("convert", "--help").output.split())


def test_method_options_are_typed_and_owned():
    split = Recipe.from_dict({"method": "split", "granularity": 2, "num_experts": 4, "top_k": 2})
    assert type(split.method_options).__name__ == "SplitOptions" and split.option("drop_ratio") == 0.5
    with pytest.raises(RecipeError, match="need --method drop"):
        Recipe.from_dict({"drop_ratio": 0.1})
    with pytest.raises(RecipeError, match="does not belong|do not belong"):
        Recipe(method="split", method_options=Recipe(method="drop").method_options)
    with pytest.raises(Exception):  # frozen: a recipe cannot change after validation
        split.top_k = 3


def test_duplicate_plugin_names_fail_at_import(tmp_path, monkeypatch):
    package = tmp_path / "dup_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in ("a", "b"):
        (package / f"{module}.py").write_text("class P:\n    name = 'same'\n\nPLUGIN = P()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="two PLUGIN plug-ins are named 'same': dup_plugins.a and dup_plugins.b"):
        collect(__import__("dup_plugins"), "PLUGIN")


def test_cli_help_lists_the_registries_without_importing_them():
    """CLI help reads names and descriptions from the plug-in sources (torch-free); they match the registries."""
    import upcycle.partitions
    import upcycle.routers
    import upcycle.targets
    from upcycle.registry import describe

    for package, attribute, found in (("upcycle.experts", "METHOD", upcycle.experts.all_methods()),
                                      ("upcycle.routers", "ROUTER", upcycle.routers.all_router_inits()),
                                      ("upcycle.partitions", "PARTITION", upcycle.partitions.all_partitions()),
                                      ("upcycle.targets", "TARGET", upcycle.targets.all_targets())):
        assert describe(package, attribute) == {name: item.description for name, item in found.items()}
