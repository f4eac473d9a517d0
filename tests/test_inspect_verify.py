"""``upcycle verify`` catches a broken MoE that claims exactness; ``upcycle inspect`` reports the
layers, experts and parameter counts that are really on disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from checks import run_cli
from factories import CONFIGS, EXACT_ATOL, make_dense, save_tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

EXPERT = re.compile(r"\.experts\.\d+\.")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A dense llama with a tokenizer and its exact 4-expert top-2 MoE."""
    root = tmp_path_factory.mktemp("verify")
    dense = make_dense("llama", root / "dense")
    save_tiny_tokenizer(dense)
    result = run_cli("convert", dense, root / "moe", "-e", "4", "-k", "2", "-q")
    assert result.exit_code == 0, result.output
    return dense, root / "moe"


def _tampered(moe: Path, folder: Path, key: str = "model.layers.1.block_sparse_moe.experts.2.w2.weight") -> Path:
    shutil.copytree(moe, folder)
    state = load_file(folder / "model.safetensors")
    state[key] = state[key] * 3.0
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _verify(dense: Path, moe: Path, *args: str):
    return run_cli("verify", dense, moe, "--json", "-q", "--max-new-tokens", "4", *args)


def test_verify_exact_conversion(pair):
    dense, moe = pair
    result = _verify(dense, moe)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exact_expected"] is True and report["passed"] is True
    assert report["max_abs_logit_diff"] <= EXACT_ATOL
    assert 0 <= report["mean_kl"] < 1e-6
    assert report["greedy_match"] == 1.0 and report["greedy_token_agreement"] == 1.0
    assert report["num_prompts"] == len(report["per_prompt"]) >= 1 and report["max_new_tokens"] == 4
    assert all(len(p["dense_tokens"]) == 4 and p["dense_tokens"] == p["moe_tokens"] for p in report["per_prompt"])


def test_verify_text_output(pair):
    dense, moe = pair
    result = run_cli("verify", dense, moe, "-q", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("PASS (exact)")
    assert "max |Δlogit|" in result.stdout and "mean KL" in result.stdout and "greedy" in result.stdout


def test_verify_fails_on_tampered_expert(tmp_path, pair):
    dense, moe = pair
    bad = _tampered(moe, tmp_path / "bad")
    result = _verify(dense, bad)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["exact_expected"] is True and report["passed"] is False
    assert report["max_abs_logit_diff"] > 1e-3 and report["mean_kl"] > 0
    text = run_cli("verify", dense, bad, "-q", "--max-new-tokens", "0")
    assert text.exit_code == 1 and text.stdout.startswith("FAIL")


def test_verify_atol(tmp_path, pair):
    dense, moe = pair
    bad = _tampered(moe, tmp_path / "bad")
    diff = json.loads(_verify(dense, bad).stdout)["max_abs_logit_diff"]
    assert _verify(dense, bad, "--atol", str(diff * 2)).exit_code == 0
    strict = _verify(dense, bad, "--atol", str(diff / 2))
    assert strict.exit_code == 1 and json.loads(strict.stdout)["passed"] is False


@pytest.mark.parametrize("shift", [0.5, -0.5])
def test_verify_catches_a_uniform_logit_shift(tmp_path, shift):
    """Every logit moved by the same amount (phi's LM-head bias), up or down: greedy tokens and KL do
    not see it, only the logit difference does, and only if it is taken in absolute value."""
    dense = make_dense("phi", tmp_path / "dense")
    result = run_cli("convert", dense, tmp_path / "moe", "-e", "2", "-k", "1", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    shifted = tmp_path / "shifted"
    shutil.copytree(dense, shifted)
    state = load_file(shifted / "model.safetensors")
    state["lm_head.bias"] = state["lm_head.bias"] + shift
    save_file(state, shifted / "model.safetensors", metadata={"format": "pt"})
    result = _verify(shifted, tmp_path / "moe")
    report = json.loads(result.stdout)
    assert report["exact_expected"] is True and report["greedy_match"] == 1.0
    assert report["max_abs_logit_diff"] == pytest.approx(0.5, abs=1e-4)
    assert result.exit_code == 1 and report["passed"] is False


def test_verify_without_exactness_claim_measures_only(tmp_path, pair):
    dense, moe = pair
    bad = _tampered(moe, tmp_path / "bad")
    recipe = json.loads((bad / "upcycle_recipe.json").read_text())
    recipe["upcycle"]["exact"] = False
    (bad / "upcycle_recipe.json").write_text(json.dumps(recipe))
    result = _verify(dense, bad)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["exact_expected"] is False and report["max_abs_logit_diff"] > 1e-3
    (bad / "upcycle_recipe.json").unlink()
    assert json.loads(_verify(dense, bad).stdout)["exact_expected"] is False


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_verify_prompts_file(tmp_path, pair, kind):
    dense, moe = pair
    prompts = ["the cat of the house", "it was a dark and stormy night", "to be or not to be"]
    path = tmp_path / f"prompts.{kind}"
    if kind == "txt":
        path.write_text("\n".join(prompts) + "\n\n")
    else:
        path.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(prompts)) + "\n")
    result = _verify(dense, moe, "--prompts", path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_prompts"] == 3 and [p["prompt"] for p in report["per_prompt"]] == prompts


def test_verify_random_ids_without_tokenizer(tmp_path):
    dense = make_dense("qwen2", tmp_path / "dense")
    assert run_cli("convert", dense, tmp_path / "moe", "-e", "3", "-k", "2", "-q").exit_code == 0
    result = _verify(dense, tmp_path / "moe")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["max_abs_logit_diff"] <= EXACT_ATOL
    assert all("random token ids" in p["prompt"] for p in report["per_prompt"])
    (tmp_path / "p.txt").write_text("hello\n")
    needs = run_cli("verify", dense, tmp_path / "moe", "--prompts", tmp_path / "p.txt", "-q")
    assert needs.exit_code != 0 and needs.output.startswith("error:") and "tokenizer" in needs.output


@pytest.mark.parametrize("content,name,fragment", [
    (None, "missing.txt", "not found"),
    ("\n\n", "empty.txt", "empty"),
    ('{"prompt": "x"}\n', "bad.jsonl", "'text'"),
])
def test_verify_bad_prompts(tmp_path, pair, content, name, fragment):
    dense, moe = pair
    if content is not None:
        (tmp_path / name).write_text(content)
    result = run_cli("verify", dense, moe, "--prompts", tmp_path / name, "-q")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("error:") and fragment in result.output


def test_verify_bad_device(pair):
    dense, moe = pair
    result = run_cli("verify", dense, moe, "--device", "warp-drive", "-q")
    assert result.exit_code == 2 and result.output.startswith("error: --device 'warp-drive'")
    assert "Traceback" not in result.output


def test_verify_bad_paths(tmp_path, pair):
    dense, moe = pair
    r = run_cli("verify", dense, tmp_path / "nope", "-q")
    assert r.exit_code != 0 and r.output.startswith("error:") and "nope" in r.output
    r = run_cli("verify", tmp_path / "nope", moe, "-q")
    assert r.exit_code != 0 and r.output.startswith("error:") and "nope" in r.output


# --- inspect ---------------------------------------------------------------------------------------

def _count_params(folder: Path) -> tuple[int, int, dict[int, int]]:
    """Total parameters, routed-expert parameters, and routed parameters per layer, read independently."""
    total, routed = 0, {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
                if EXPERT.search(key):
                    layer = int(key.split(".layers.")[1].split(".")[0])
                    routed[layer] = routed.get(layer, 0) + n
    return total, sum(routed.values()), routed


@pytest.mark.parametrize("family,experts,top_k,shard", [("llama", 4, 2, None), ("qwen2", 6, 1, "150KB"),
                                                        ("qwen3", 3, 3, None)])
def test_inspect_counts(tmp_path, family, experts, top_k, shard):
    import upcycle

    dense = make_dense(family, tmp_path / "dense")
    out = tmp_path / "moe"
    args = ["-e", str(experts), "-k", str(top_k), "-q", "--seed", "3"] + (["--max-shard-size", shard] if shard else [])
    conv = run_cli("convert", dense, out, *args, "--json")
    assert conv.exit_code == 0, conv.output
    summary = json.loads(conv.stdout)
    result = run_cli("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info == upcycle.inspect(out)

    total, routed, per_layer = _count_params(out)
    assert sorted(per_layer) == info["moe_layers"] == [0, 1, 2] and info["num_layers"] == 3
    assert info["num_experts"] == experts and info["top_k"] == top_k and info["expert_size"] == 96
    assert info["total_params"] == total == summary["total_params"]
    assert info["active_params"] == summary["active_params"]
    assert abs(info["active_params"] - (total - (experts - top_k) / experts * routed)) <= 3
    if top_k == experts:
        assert info["active_params"] == total
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in out.iterdir())
    assert info["family"] == family and info["source"] == dense.name and info["exact"] is True
    assert info["recipe"]["num_experts"] == experts and info["recipe"]["seed"] == 3 and "upcycle" not in info["recipe"]
    assert info["dtype"] == "float32" and info["model_type"] == summary["target"]


def test_inspect_text(pair):
    _, moe = pair
    result = run_cli("inspect", moe)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "MixtralForCausalLM (mixtral), upcycled from" in text and "(llama)" in text
    assert "layers: 3/3 MoE (all)" in text and "experts: 4 x 96, top-2" in text
    assert "active per token" in text and "on disk:" in text and "recipe: method replicate" in text
    assert "note:" in text  # replicated experts: the symmetry warning


def test_inspect_dense_model(pair):
    import upcycle

    dense, _ = pair
    info = upcycle.inspect(dense)
    assert info["moe_layers"] == [] and info["num_experts"] is None and info["recipe"] is None
    assert info["active_params"] == info["total_params"] == _count_params(dense)[0]


def test_inspect_errors(tmp_path, pair):
    r = run_cli("inspect", tmp_path / "nope")
    assert r.exit_code != 0 and r.output.startswith("error:") and "config.json" in r.output
    dense, _ = pair
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copyfile(dense / "config.json", binary / "config.json")
    torch.save(load_file(dense / "model.safetensors"), binary / "pytorch_model.bin")
    r = run_cli("inspect", binary)
    assert r.exit_code != 0 and r.output.startswith("error:") and "safetensors" in r.output


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_inspect_agrees_with_the_plan(tmp_path, family):
    """For every family's auto target (packed experts included), inspect finds the MoE layers and
    counts the same active parameters as the conversion planned."""
    import upcycle

    result = upcycle.convert(make_dense(family, tmp_path / "dense"), tmp_path / "moe", num_experts=4, top_k=1,
                             quiet=True, verify=False)
    info = upcycle.inspect(tmp_path / "moe")
    s = result.summary
    assert info["moe_layers"] == s["moe_layers"] and info["num_experts"] == 4 and info["top_k"] == 1
    assert info["total_params"] == s["total_params"]
    assert info["active_params"] == s["active_params"] < s["total_params"]
