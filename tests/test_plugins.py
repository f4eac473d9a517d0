"""The plug-in shape the restructure promises: a new expert method with one option is one module, found by
name, reachable from the CLI (``--method``, ``-o``) and recipe files; duplicate names fail at import."""

import json
import textwrap

import pytest

import upcycle.experts
from checks import run_cli
from factories import make_dense, max_logit_diff
from upcycle.errors import RecipeError
from upcycle.recipe import Recipe
from upcycle.registry import collect

HALVES = textwrap.dedent('''
    """Example method: every expert keeps the dense FFN with its down projection scaled by ``scale``."""
    from dataclasses import dataclass

    from upcycle.errors import RecipeError
    from upcycle.experts.base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext, MethodOptions


    @dataclass(frozen=True)
    class ScaledOptions(MethodOptions):
        scale: float = 1.0

        def check(self, recipe):
            if not 0 < float(self.scale) <= 2:
                raise RecipeError(f"--scale must be in (0, 2], got {self.scale}")


    def build(ctx: MethodContext) -> LayerExperts:
        sl = ExpertSlice(down_scale=float(ctx.options.scale))
        return LayerExperts(experts=[sl] * ctx.num_experts, groups=list(range(ctx.num_experts)),
                            exact=ctx.options.scale == 1.0)


    METHOD = ExpertMethod(name="scaled", exact=True, build=build, options=ScaledOptions,
                          description="copies with a scaled down projection")
''')


@pytest.fixture
def scaled_method(tmp_path, monkeypatch):
    """Drop the module into the experts package (as a new file in upcycle/experts/ would be) and rescan."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scaled.py").write_text(HALVES)
    monkeypatch.setattr(upcycle.experts, "__path__", [*upcycle.experts.__path__, str(folder)])
    upcycle.experts.all_methods.cache_clear()
    yield
    upcycle.experts.all_methods.cache_clear()


def test_new_method_with_one_option_is_one_module(tmp_path, scaled_method):
    dense = make_dense("llama", tmp_path / "dense")
    exact = tmp_path / "exact"
    result = run_cli("convert", str(dense), str(exact), "--method", "scaled", "-e", "2", "-k", "1", "-q")
    assert result.exit_code == 0, result.output
    assert max_logit_diff(dense, exact) <= 1e-4
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
