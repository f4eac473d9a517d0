"""Exactness at the measured noise: every family's exact conversion is within ``EXACT_ATOL`` of the dense
model, and a 1e-3 relative error in one routed expert is not (docs/testing.md has the measurements);
an inexact router is never recorded as exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checks import run_cli
from factories import CONFIGS, EXACT_ATOL, make_dense, max_logit_diff, perturb_one_expert, save_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_one_expert_off_by_1e3_is_caught(tmp_path, family):
    dense = make_dense(family, tmp_path / "dense")
    moe = tmp_path / "moe"
    result = run_cli("convert", dense, moe, "-e", "4", "-k", "2", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    noise = max_logit_diff(dense, moe)
    assert noise <= EXACT_ATOL
    caught = 0
    for expert in range(4):
        copy = tmp_path / f"moe{expert}"
        shutil.copytree(moe, copy)
        perturb_one_expert(copy, expert, rel=1e-3)
        diff = max_logit_diff(dense, copy)
        # an expert that no token reaches leaves every logit bit for bit as it was
        assert diff == noise or diff > EXACT_ATOL, (expert, diff)
        caught += diff > EXACT_ATOL
    assert caught >= 2  # top-2: at least two experts serve some token


def test_inexact_router_is_recorded_inexact(tmp_path):
    """Centroid routers on a split pick experts by activation, so the MoE is not the dense function:
    with --allow-inexact --no-verify nothing measures it, and the recipe must still say exact: false."""
    dense = make_dense("llama", tmp_path / "dense")
    save_tiny_tokenizer(dense)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"the w{i % 50} of w{i % 13}" for i in range(300)))
    moe = tmp_path / "moe"
    result = run_cli("convert", dense, moe, "--method", "split", "-g", "2", "-e", "4", "-k", "2",
                     "--router-init", "centroid", "--calibration", text, "--allow-inexact", "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    recipe = json.loads((moe / "upcycle_recipe.json").read_text())
    assert recipe["upcycle"]["exact"] is False
    assert max_logit_diff(dense, moe) > 1e-3


@pytest.mark.parametrize("args", [
    ("--method", "drop"),                                      # the method is not exact
    ("--noise-std", "0.01"),                                   # an exact method with noise
    ("--method", "split", "-g", "2", "-e", "4", "-k", "1"),    # top-k splits a virtual group: the layers are not
])
def test_every_inexact_recipe_is_recorded_inexact(tmp_path, args):
    """Each term of the exactness decision on its own: with --allow-inexact --no-verify nothing measures
    the output, so the recipe's exact flag is all the user has."""
    dense = make_dense("llama", tmp_path / "dense")
    moe = tmp_path / "moe"
    result = run_cli("convert", dense, moe, "-e", "4", "-k", "2", *args, "--allow-inexact", "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((moe / "upcycle_recipe.json").read_text())["upcycle"]["exact"] is False
    assert max_logit_diff(dense, moe) > EXACT_ATOL


def test_exact_split_is_recorded_exact(tmp_path):
    """The same split with its exactness-keeping router (virtual groups whole) is exact, and says so."""
    dense = make_dense("llama", tmp_path / "dense")
    moe = tmp_path / "moe"
    result = run_cli("convert", dense, moe, "--method", "split", "-g", "2", "-e", "4", "-k", "2", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    recorded = json.loads((moe / "upcycle_recipe.json").read_text())["upcycle"]
    assert recorded["exact"] is True and max_logit_diff(dense, moe) <= EXACT_ATOL
    assert (recorded["dense_ffn_size"], recorded["expert_size"], recorded["shared_expert_size"]) == (96, 48, 0)
