"""Conversion-time verification: measured, recorded in upcycle_recipe.json and the card, skipped when
the MoE would not fit in memory, and fatal (nothing written) when an exact recipe fails it."""

import importlib

import pytest
from click.testing import CliRunner
from factories import EXACT_ATOL, make_dense, read_json

from upcycle.cli import cli
from upcycle.errors import VerificationError

# the modules, not the API functions of the same name that ``upcycle.convert``/``upcycle.verify`` are
convert_module = importlib.import_module("upcycle.convert")
verify_module = importlib.import_module("upcycle.verify")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_dense("mistral", tmp_path_factory.mktemp("verify") / "dense")


def test_conversion_records_the_measured_verification(dense, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(dense), str(tmp_path / "moe"), "-e", "4", "-k", "2", "-q"])
    assert result.exit_code == 0, result.output
    measured = read_json(tmp_path / "moe" / "upcycle_recipe.json")["upcycle"]["verification"]
    assert measured["exact_expected"] and measured["passed"] and measured["max_abs_logit_diff"] <= EXACT_ATOL
    assert measured["num_prompts"] >= 1 and measured["dtype"] == "float32"
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"max |Δlogit| = {measured['max_abs_logit_diff']:.3g}" in card
    assert "verification: exact, checked at conversion time" in result.output


def test_conversion_verifies_even_when_the_models_would_not_fit_in_memory(dense, tmp_path, monkeypatch):
    """No "skipped: too big": the check streams one layer at a time and compares next-token predictions."""
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1000)
    result = convert_module.convert(dense, tmp_path / "auto", num_experts=4, top_k=2, quiet=True)
    v = result.verification
    assert v["passed"] and v["finite"] and v["comparison"] == "teacher-forced next tokens"
    assert len(v["per_layer_max_abs_diff"]) == 3 and max(v["per_layer_max_abs_diff"]) <= 1e-4
    card = (tmp_path / "auto" / "README.md").read_text()
    assert "exact, checked at conversion time" in card and "compared after each of the 3 layers" in card
    skipped = convert_module.convert(dense, tmp_path / "off", num_experts=4, top_k=2, quiet=True, verify=False)
    assert skipped.verification == {"skipped": "disabled with --no-verify"}


def test_conversion_check_takes_device_and_dtype(dense, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(dense), str(tmp_path / "moe"), "-e", "4", "-k", "2", "-q",
                                      "--device", "auto", "--compute-dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.output
    measured = read_json(tmp_path / "moe" / "upcycle_recipe.json")["upcycle"]["verification"]
    assert measured["dtype"] == "bfloat16" and measured["device"] in ("cpu", "cuda", "mps") and measured["passed"]
    bad = CliRunner().invoke(cli, ["convert", str(dense), str(tmp_path / "x"), "--device", "warp", "-q"])
    assert bad.exit_code == 2 and "--device 'warp'" in bad.output and not (tmp_path / "x").exists()


def test_conversion_writes_nothing_when_an_exact_recipe_fails_verification(dense, tmp_path, monkeypatch):
    real = verify_module.verify

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        report.max_abs_logit_diff, report.passed = 0.5, False
        return report

    monkeypatch.setattr(convert_module, "run_verify", broken)
    with pytest.raises(VerificationError, match="nothing was written"):
        convert_module.convert(dense, tmp_path / "moe", num_experts=4, top_k=2, quiet=True)
    assert not (tmp_path / "moe").exists() and list(tmp_path.iterdir()) == []


def test_conversion_verification_compares_against_the_dense_weights_in_the_output_dtype(dense, tmp_path):
    result = convert_module.convert(dense, tmp_path / "bf16", num_experts=4, top_k=2, dtype="bfloat16", quiet=True)
    v = result.verification
    assert v["dense_rounded_to"] == "bfloat16" and v["passed"] and v["max_abs_logit_diff"] <= EXACT_ATOL
    assert "rounded to bfloat16" in (tmp_path / "bf16" / "README.md").read_text()
