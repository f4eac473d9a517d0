"""``--seed`` makes conversions reproducible byte for byte; router inits do what they say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import run_cli, tree_hashes
from factories import EXACT_ATOL, make_dense, max_logit_diff, read_json, save_tiny_tokenizer
from safetensors.torch import load_file

ROUTER = re.compile(r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.gate\.weight$")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    folder = make_dense("mistral", tmp_path_factory.mktemp("det") / "dense")
    save_tiny_tokenizer(folder)
    return folder


def _convert(dense: Path, out: Path, *args: str) -> Path:
    result = run_cli("convert", dense, out, "-e", "8", "-k", "2", "-q", *args)
    assert result.exit_code == 0, result.output
    return out


def _routers(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if ROUTER.match(k)}


def test_same_seed_byte_identical(tmp_path, dense):
    """In-process and in a fresh interpreter with another hash seed: the same bytes."""
    a = _convert(dense, tmp_path / "a", "--seed", "5")
    b = tmp_path / "b"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "upcycle", "convert", str(dense), str(b), "-e", "8", "-k", "2", "-q",
                    "--seed", "5"], cwd=Path(__file__).resolve().parents[1], env=env, check=True, timeout=300)
    hashes = tree_hashes(a)
    assert {"model.safetensors", "config.json", "generation_config.json", "upcycle_recipe.json", "README.md",
            "tokenizer.json"} <= set(hashes)
    assert hashes == tree_hashes(b)


def test_same_seed_byte_identical_sharded(tmp_path, dense):
    a = _convert(dense, tmp_path / "a", "--max-shard-size", "100KB")
    b = _convert(dense, tmp_path / "b", "--max-shard-size", "100KB")
    assert len(list(a.glob("model-*.safetensors"))) > 1
    assert tree_hashes(a) == tree_hashes(b)


def test_different_seed_changes_only_routers(tmp_path, dense):
    a = load_file(_convert(dense, tmp_path / "a", "--seed", "1") / "model.safetensors")
    b = load_file(_convert(dense, tmp_path / "b", "--seed", "2") / "model.safetensors")
    assert a.keys() == b.keys()
    routers = [k for k in a if ROUTER.match(k)]
    assert len(routers) == 3
    for key in a:
        assert torch.equal(a[key], b[key]) is (key not in routers), key
    # every layer gets its own router, and experts in a layer get different rows
    assert not torch.equal(a[routers[0]], a[routers[1]])
    assert all(len({tuple(row.tolist()) for row in a[k]}) == 8 for k in routers)


def test_zeros_router(tmp_path, dense):
    out = _convert(dense, tmp_path / "z", "--router-init", "zeros")
    routers = _routers(out)
    assert len(routers) == 3 and all(w.shape == (8, 64) and not w.any() for w in routers.values())
    assert max_logit_diff(dense, out) <= EXACT_ATOL


@pytest.mark.parametrize("std", [None, 0.5])
def test_normal_router_std(tmp_path, dense, std):
    args = ["--router-std", str(std)] if std is not None else []
    out = _convert(dense, tmp_path / "n", "--seed", "9", *args)
    weights = torch.cat([w.flatten() for w in _routers(out).values()])
    assert weights.numel() == 3 * 8 * 64
    expected = 0.02 if std is None else std
    assert abs(float(weights.std()) / expected - 1) < 0.1
    assert abs(float(weights.mean())) < 0.1 * expected
    assert max_logit_diff(dense, out) <= EXACT_ATOL  # replicate is exact whatever the router


def test_router_std_zero_gives_zero_router(tmp_path, dense):
    out = _convert(dense, tmp_path / "s0", "--router-std", "0")
    assert not any(w.any() for w in _routers(out).values())


def _with_threads(n: int, dense: Path, out: Path, *args: str) -> dict[str, str]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return tree_hashes(_convert(dense, out, *args))
    finally:
        torch.set_num_threads(before)


def test_thread_count_does_not_change_the_model(tmp_path, dense):
    """Weights, config, recipe and card (with the verification measured at conversion time) do not
    depend on how many threads torch uses, for a conversion whose every step reduces floats in
    parallel: k-means neuron clusters and centroid routers from calibration activations, then the
    check's forward passes (replicate would copy bytes and could not vary)."""
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i % 37} token{i % 11}" for i in range(400)))
    args = ("--method", "split", "-g", "2", "--split-strategy", "kmeans", "--router-init", "centroid",
            "--calibration", str(text), "--allow-inexact", "--verify")
    one = _with_threads(1, dense, tmp_path / "one", *args)
    two = _with_threads(2, dense, tmp_path / "two", *args)
    assert one == two
    recipe = read_json(tmp_path / "one" / "upcycle_recipe.json")["upcycle"]
    assert recipe["exact"] is False and recipe["verification"]["max_abs_logit_diff"] > 1e-3

