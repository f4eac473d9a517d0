"""verify through the layer-streaming runner: a per-layer report that names the first layer that breaks,
non-finite values always fail, a layer cap changes nothing, and generation gives way to teacher forcing
when the models do not fit the memory budget."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checks import run_cli
from factories import make_dense, save_tiny_tokenizer
from safetensors.torch import load_file, save_file

from upcycle.runner import MAX_LAYERS_ENV
from upcycle.verify import DEFAULT_PROMPTS, verify

ROUTER = "model.layers.{i}.block_sparse_moe.gate.weight"
EXPERT = "model.layers.{i}.block_sparse_moe.experts.1.w2.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 5-layer dense llama with a tokenizer and its exact 4-expert top-2 Mixtral."""
    root = tmp_path_factory.mktemp("streamed")
    dense = make_dense("llama", root / "dense", num_hidden_layers=5)
    save_tiny_tokenizer(dense)
    result = run_cli("convert", dense, root / "moe", "-e", "4", "-k", "2", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    return dense, root / "moe"


def _edited(moe, folder, key, edit):
    shutil.copytree(moe, folder)
    state = load_file(folder / "model.safetensors")
    state[key] = edit(state[key])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _report(dense, moe, *args):
    result = run_cli("verify", dense, moe, "--json", "-q", "--max-new-tokens", "3", *args)
    return result.exit_code, json.loads(result.stdout)


def test_exact_pair_reports_every_layer(pair):
    code, report = _report(*pair)
    assert code == 0 and report["passed"] and report["finite"]
    assert [layer["layer"] for layer in report["per_layer"]] == [0, 1, 2, 3, 4]
    assert all(layer["max_abs_diff"] <= 1e-4 and not layer["broken"] for layer in report["per_layer"])
    assert report["first_broken_layer"] is None and report["comparison"] == "greedy generation"


def test_perturbed_layer_is_named(tmp_path, pair):
    dense, moe = pair
    bad = _edited(moe, tmp_path / "bad", EXPERT.format(i=3), lambda t: t * 3.0)
    code, report = _report(dense, bad)
    assert code == 1 and not report["passed"] and report["first_broken_layer"] == 3
    assert [layer["broken"] for layer in report["per_layer"]] == [False, False, False, True, True]
    text = run_cli("verify", dense, bad, "-q", "--max-new-tokens", "0")
    assert text.exit_code == 1 and "first differ after layer 3" in text.stdout


def test_atol_decides_the_verdict(tmp_path, pair):
    """The same broken expert passes under a tolerance above its logit difference and fails under one below."""
    dense, moe = pair
    bad = _edited(moe, tmp_path / "bad", EXPERT.format(i=3), lambda t: t * 1.5)
    report = verify(dense, bad, max_new_tokens=0, quiet=True)
    diff = report.max_abs_logit_diff
    assert report.atol == 1e-3 and diff > 1e-3 and not report.passed
    loose = verify(dense, bad, max_new_tokens=0, quiet=True, atol=2 * diff)
    assert loose.atol == 2 * diff and loose.passed and loose.first_broken_layer is None
    strict = verify(dense, moe, max_new_tokens=0, quiet=True, atol=1e-9)
    assert strict.atol == 1e-9 and not strict.passed
    assert verify(dense, bad, max_new_tokens=0, quiet=True, atol=diff).passed   # the bound itself passes
    # a recipe that does not claim exactness is measured, never failed for its difference
    recipe = json.loads((bad / "upcycle_recipe.json").read_text())
    recipe["upcycle"]["exact"] = False
    (bad / "upcycle_recipe.json").write_text(json.dumps(recipe))
    measured = verify(dense, bad, max_new_tokens=0, quiet=True)
    assert measured.exact_expected is False and measured.passed and measured.max_abs_logit_diff == diff


def test_report_fields_of_an_exact_pair(pair):
    report = verify(*pair, max_new_tokens=2, quiet=True)
    assert report.exact_expected is True and report.passed and report.finite
    assert [p["prompt"] for p in report.per_prompt] == list(DEFAULT_PROMPTS)   # the pair has a tokenizer


def test_non_finite_logits_fail_even_with_finite_layers(tmp_path, pair):
    """An infinite final norm leaves every decoder layer's output finite but not the logits."""
    dense, moe = pair
    bad = _edited(moe, tmp_path / "bad", "model.norm.weight", lambda t: torch.full_like(t, float("inf")))
    report = verify(dense, bad, max_new_tokens=0, quiet=True)
    assert all(layer["finite"] for layer in report.per_layer)
    assert not report.finite and not report.passed


def test_force_expert_uses_the_merge_record(tmp_path, pair):
    """--force-expert compares against what the merge recorded for that expert, not the recipe's exact flag."""
    dense, moe = pair
    forced = tmp_path / "forced"
    shutil.copytree(moe, forced)
    report = verify(dense, forced, max_new_tokens=0, quiet=True, force_expert=1)
    assert report.exact_expected is False and report.passed        # the replicate recipe records no merge
    recipe = json.loads((forced / "upcycle_recipe.json").read_text())
    recipe["upcycle"]["merge"] = {"forced_exact": [False, True, False, False]}
    (forced / "upcycle_recipe.json").write_text(json.dumps(recipe))
    assert verify(dense, forced, max_new_tokens=0, quiet=True, force_expert=1).exact_expected is True
    assert verify(dense, forced, max_new_tokens=0, quiet=True, force_expert=2).exact_expected is False


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_router_fails(tmp_path, pair, value):
    dense, moe = pair
    bad = _edited(moe, tmp_path / "bad", ROUTER.format(i=2), lambda t: torch.full_like(t, value))
    code, report = _report(dense, bad)
    assert code == 1 and not report["passed"] and not report["finite"]
    assert report["first_broken_layer"] == 2 and not report["per_layer"][2]["finite"]
    # not even a recipe that does not claim exactness passes with NaN or inf
    recipe = json.loads((bad / "upcycle_recipe.json").read_text())
    recipe["upcycle"]["exact"] = False
    (bad / "upcycle_recipe.json").write_text(json.dumps(recipe))
    code, report = _report(dense, bad)
    assert code == 1 and not report["passed"]
    assert run_cli("verify", dense, bad, "-q", "--max-new-tokens", "0").stdout.startswith("FAIL: non-finite")


def test_layer_cap_gives_the_same_report(tmp_path, pair, monkeypatch):
    dense, moe = pair
    bad = _edited(moe, tmp_path / "bad", EXPERT.format(i=1), lambda t: t * 1.5)
    free = verify(dense, bad, max_new_tokens=2, quiet=True).to_dict()
    capped = verify(dense, bad, max_new_tokens=2, quiet=True, max_layers=1).to_dict()
    monkeypatch.setenv(MAX_LAYERS_ENV, "1")
    from_env = verify(dense, bad, max_new_tokens=2, quiet=True).to_dict()
    assert free == capped == from_env
    assert free["first_broken_layer"] == 1


def test_teacher_forcing_when_the_models_do_not_fit(pair):
    dense, moe = pair
    code, report = _report(dense, moe, "--memory-budget", "0.000001")
    assert code == 0 and report["comparison"] == "teacher-forced next tokens"
    assert report["max_new_tokens"] == 0 and report["greedy_token_agreement"] == 1.0
    assert all(len(p["dense_tokens"]) > 0 and p["dense_tokens"] == p["moe_tokens"] for p in report["per_prompt"])
    text = run_cli("verify", dense, moe, "-q", "--memory-budget", "0.000001")
    assert "teacher-forced next tokens: 100% agree" in text.stdout


def test_device_auto_runs(pair):
    code, report = _report(*pair, "--device", "auto")
    assert code == 0 and report["device"] in ("cpu", "cuda", "mps")


def test_split_selections_are_counted(tmp_path):
    """A fine-grained split reports how many router selections split a virtual group: none at fp32; a
    router whose groups tie (rows of groups 0 and 1 made equal but listed apart) splits them."""
    from upcycle.verify import split_selections

    logits = torch.tensor([[3.0, 3.0, 2.0, 2.0, 1.0, 1.0],    # groups of 2: picks groups 0 and 1 whole
                           [3.0, 3.0, 2.0, 0.5, 1.0, 1.0]])   # expert 2 without 3: group 1 split
    assert split_selections(logits, 4, 2) == (1, 2)
    dense = make_dense("llama", tmp_path / "dense")
    result = run_cli("convert", dense, tmp_path / "moe", "-e", "8", "-k", "4", "--method", "split", "-g", "2",
                     "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    report = verify(dense, tmp_path / "moe", max_new_tokens=0, quiet=True)
    assert report.passed and report.split_selections == 0 and report.router_selections == 3 * (5 + 11 + 17 + 23)
    assert all(layer["split_selections"] == 0 for layer in report.per_layer)
    replicate = tmp_path / "replicate"
    assert run_cli("convert", dense, replicate, "-e", "4", "-k", "2", "-q", "--no-verify").exit_code == 0
    assert verify(dense, replicate, max_new_tokens=0, quiet=True).split_selections is None
