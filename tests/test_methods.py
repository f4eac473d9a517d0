"""Expert methods, router inits, calibration, layer selection and recipes (issue 3).

Exact recipes are checked against the dense model at fp32 (max |Δlogit| <= EXACT_ATOL (3.8e-6, docs/testing.md)), loaded with plain
AutoModelForCausalLM. Dense models, tokenizer and calibration text are made once per module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import CONFIGS, EXACT_ATOL, VOCAB, make_dense, max_logit_diff, read_json, save_tiny_tokenizer
from safetensors.torch import load_file

from upcycle.cli import cli

NATIVE = {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()
IDS = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Dense llama/qwen2/qwen3 models with a tokenizer, their logits, and a calibration text."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("methods")
    dense, logits = {}, {}
    for family in NATIVE:
        folder = make_dense(family, root / family)
        save_tiny_tokenizer(folder)
        dense[family] = folder
        with torch.no_grad():
            logits[family] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(IDS).logits
    rng = random.Random(0)
    text = root / "calibration.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(15)))
    return {"root": root, "dense": dense, "logits": logits, "text": text, "count": [0]}


def convert(work, family, *args, ok=True, verify=False):
    """Run ``upcycle convert`` (conversion-time verification off unless asked: the tests measure logits)."""
    work["count"][0] += 1
    out = work["root"] / f"out{work['count'][0]}"
    flag = "--verify" if verify else "--no-verify"
    result = CliRunner().invoke(cli, ["convert", str(work["dense"][family]), str(out), "-q", flag, *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return out, result


def logit_diff(work, family, out) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == NATIVE[family]
    with torch.no_grad():
        return float((model(IDS).logits - work["logits"][family]).abs().max())


# --- exactness matrix ---------------------------------------------------------------------------
# Every split strategy x shared experts x native target x layer selection that the target can express.
# Each strategy runs with a different exact router init, so every init is covered too.
STRATEGY_ROUTER = {"contiguous": "virtual-group", "random": "normal", "kmeans": "zeros", "activation": "kmeans"}
CASES = [(family, strategy, shared, layers)
         for family in NATIVE for strategy in STRATEGY_ROUTER for shared in (0, 1) for layers in ("all", "every:2")
         if (not shared or family == "qwen2") and (layers == "all" or family != "llama")]


@pytest.mark.parametrize("family,strategy,shared,layers", CASES,
                         ids=[f"{f}-{s}-shared{h}-{l}" for f, s, h, l in CASES])
def test_split_is_exact(work, family, strategy, shared, layers):
    # G=4: without shared experts 8 experts in groups of 4 (top-4); with one shared, groups of 3 (top-3).
    group = 4 - shared
    args = ["--method", "split", "-g", 4, "-e", 2 * group, "-k", group, "--split-strategy", strategy,
            "--router-init", STRATEGY_ROUTER[strategy], "--shared-experts", shared, "--layers", layers]
    if strategy == "activation":
        args += ["--calibration", work["text"]]
    out, _ = convert(work, family, *args)
    assert logit_diff(work, family, out) <= EXACT_ATOL
    provenance = read_json(out / "upcycle_recipe.json")["upcycle"]
    assert provenance["exact"] is True
    assert provenance["expert_size"] == 24
    assert provenance["moe_layers"] == ([0, 1, 2] if layers == "all" else [1])
    weights = load_file(out / "model.safetensors")
    if shared:
        down = weights["model.layers.1.mlp.shared_expert.down_proj.weight"]
        assert down.shape == (64, 24) and down.abs().sum() > 0
    if layers != "all":
        assert "model.layers.0.mlp.gate_proj.weight" in weights  # dense layers keep their MLP


@pytest.mark.parametrize("router", ["kmeans", "centroid", "normal"])
def test_replicate_router_inits_are_exact(work, router):
    out, _ = convert(work, "llama", "-e", 4, "-k", 2, "--router-init", router, "--calibration", work["text"])
    assert logit_diff(work, "llama", out) <= EXACT_ATOL


def test_inexact_top_k_is_refused_then_recorded(work):
    args = ["--method", "split", "-g", 4, "-e", 8, "-k", 2]
    _, refused = convert(work, "qwen3", *args, ok=False)
    assert refused.exit_code == 2 and "multiple of" in refused.output and "--allow-inexact" in refused.output
    out, _ = convert(work, "qwen3", *args, "--allow-inexact")
    recipe = read_json(out / "upcycle_recipe.json")
    assert recipe["allow_inexact"] is True and recipe["upcycle"]["exact"] is False
    assert logit_diff(work, "qwen3", out) > 1e-3  # the exactness test above is able to fail


def test_router_rows_are_shared_within_virtual_groups(work):
    out, _ = convert(work, "qwen3", "--method", "split", "-g", 2, "-e", 6, "-k", 2, "--router-init", "kmeans",
                     "--calibration", work["text"], "--split-strategy", "activation", "--router-std", 0.05)
    router = load_file(out / "model.safetensors")["model.layers.0.mlp.gate.weight"]
    groups = router.view(3, 2, -1)
    assert torch.equal(groups[:, 0], groups[:, 1])
    assert not torch.allclose(groups[0, 0], groups[1, 0])
    torch.testing.assert_close(router.norm(dim=1), torch.full((6,), 0.05 * 64 ** 0.5))


def test_centroid_router_on_split_needs_allow_inexact(work):
    _, refused = convert(work, "qwen3", "--method", "split", "-g", 2, "-e", 2, "-k", 2, "--router-init", "centroid",
                         "--dry-run", ok=False)
    assert refused.exit_code == 2 and "virtual-group" in refused.output


# --- Drop-Upcycling and noise -------------------------------------------------------------------
def _reinitialised(expert: torch.Tensor, dense: torch.Tensor, dim: int) -> set[int]:
    changed = (expert != dense).any(dim=1 - dim)
    return set(changed.nonzero().flatten().tolist())


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_drop_reinitialises_a_fraction_per_expert(work, ratio):
    out, _ = convert(work, "qwen2", "--method", "drop", "--drop-ratio", ratio, "-e", 4, "-k", 2, "--seed", 3)
    dense = load_file(work["dense"]["qwen2"] / "model.safetensors")
    moe = load_file(out / "model.safetensors")
    sets = []
    for e in range(4):
        prefix = f"model.layers.1.mlp.experts.{e}."
        gate = _reinitialised(moe[prefix + "gate_proj.weight"], dense["model.layers.1.mlp.gate_proj.weight"], 0)
        up = _reinitialised(moe[prefix + "up_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"], 0)
        down = _reinitialised(moe[prefix + "down_proj.weight"], dense["model.layers.1.mlp.down_proj.weight"], 1)
        assert gate == up == down
        assert abs(len(gate) / 96 - ratio) <= 0.05
        sets.append(gate)
    assert len({frozenset(s) for s in sets}) == 4
    fresh = moe["model.layers.1.mlp.experts.0.gate_proj.weight"][sorted(sets[0])]
    original = dense["model.layers.1.mlp.gate_proj.weight"]
    assert abs(float(fresh.std()) / float(original.std()) - 1) < 0.2
    assert read_json(out / "upcycle_recipe.json")["upcycle"]["exact"] is False


def test_verify_reports_drop_deviation(work):
    out, _ = convert(work, "qwen2", "--method", "drop", "-e", 4, "-k", 2)
    result = CliRunner().invoke(cli, ["verify", str(work["dense"]["qwen2"]), str(out), "--json", "-q",
                                      "--max-new-tokens", 0])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exact_expected"] is False and report["max_abs_logit_diff"] > 1e-3


def test_noise_breaks_symmetry_and_seed_reproduces(work):
    args = ["-e", 3, "-k", 1, "--noise-std", 0.01, "--seed", 5]
    first, _ = convert(work, "llama", *args)
    again, _ = convert(work, "llama", *args)
    other, _ = convert(work, "llama", *args[:-1], 6)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    moe = load_file(first / "model.safetensors")
    dense = load_file(work["dense"]["llama"] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    deltas = [moe[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"] - dense for e in range(3)]
    assert all(abs(float(d.std()) - 0.01) < 0.002 for d in deltas)
    assert not torch.equal(deltas[0], deltas[1])
    assert read_json(first / "upcycle_recipe.json")["upcycle"]["exact"] is False


# --- recipes ------------------------------------------------------------------------------------
def test_recipe_file_flags_override_and_output_recipe_reproduces(work, tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "split", "granularity": 4, "num_experts": 6, "top_k": 3,
                                      "shared_experts": 1, "split_strategy": "activation", "router_init": "kmeans",
                                      "calibration": str(work["text"]), "layers": [0, 2], "seed": 1}))
    out, _ = convert(work, "qwen2", "--recipe", recipe, "--seed", 9, verify=True)
    written = read_json(out / "upcycle_recipe.json")
    assert written["seed"] == 9 and written["layers"] == "0,2" and written["shared_experts"] == 1
    assert logit_diff(work, "qwen2", out) <= EXACT_ATOL
    assert written["calibration"] == work["text"].name  # published files hold no local path (issue 13)
    again, _ = convert(work, "qwen2", "--recipe", out / "upcycle_recipe.json", "--calibration", work["text"])
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_dry_run_reads_no_weights_and_no_model(work, monkeypatch):
    import transformers

    from upcycle.io.folder import SafetensorsFolder

    def forbidden(*args, **kwargs):
        raise AssertionError("dry run read weights")

    monkeypatch.setattr(SafetensorsFolder, "read", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    out, result = convert(work, "qwen2", "--method", "split", "-g", 4, "-e", 8, "-k", 4, "--split-strategy",
                          "activation", "--router-init", "kmeans", "--calibration", work["text"], "--dry-run",
                          "--json")
    summary = json.loads(result.output)
    assert summary["exact"] is True and summary["expert_size"] == 24 and not out.exists()


# --- bad input ----------------------------------------------------------------------------------
BAD = [
    (["--method", "split", "-g", 5, "-e", 5, "-k", 5], "does not divide the FFN width 96"),
    (["--method", "split", "-g", 4, "-e", 6, "-k", 4], "must be a multiple of"),
    (["--method", "split", "-g", 4, "-e", 8, "-k", 4, "--split-strategy", "activation"], "--calibration PATH"),
    (["--router-init", "kmeans"], "--calibration PATH"),
    (["--method", "split", "-g", 2, "-e", 2, "-k", 2, "--shared-experts", 2], "smaller than --granularity"),
    (["--granularity", 2], "needs --method split"),
    (["--method", "split", "-g", 2, "-e", 2, "-k", 2, "--split-strategy", "spectral"], "unknown --split-strategy"),
    (["--layers", "5-9"], "no layer 5"),
    (["--layers", "every:x"], "cannot read"),
    (["--drop-ratio", 1.5, "--method", "drop"], "between 0 and 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line(work, args, message):
    out, result = convert(work, "qwen3", *args, ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


LAYOUTS_MIXTRAL_CANNOT_HOLD = [
    (["--method", "split", "-g", 4, "-e", 6, "-k", 3, "--shared-experts", 1], "no shared expert"),
    (["--layers", "every:2"], "puts an MoE block in every layer"),
]


@pytest.mark.parametrize("args,message", LAYOUTS_MIXTRAL_CANNOT_HOLD, ids=["shared", "layers"])
def test_mixtral_refuses_what_it_cannot_express(work, args, message):
    _, result = convert(work, "llama", *args, "--target", "mixtral", "--dry-run", ok=False)
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("args,message", LAYOUTS_MIXTRAL_CANNOT_HOLD, ids=["shared", "layers"])
def test_auto_falls_back_to_the_bundled_model(work, args, message):
    """What mixtral cannot hold, ``--target auto`` writes as the bundled model, exactly."""
    out, result = convert(work, "llama", *args)
    assert read_json(out / "config.json")["model_type"] == "upcycle_moe"
    assert max_logit_diff(work["dense"]["llama"], out) <= EXACT_ATOL


def test_calibration_errors(work, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "the a of to"}) + "\n")
    args = ["--router-init", "kmeans", "-e", 4, "-k", 2, "--dry-run", "--calibration"]
    _, result = convert(work, "qwen3", *args, empty, ok=False)
    assert result.exit_code == 2 and "no text" in result.output
    _, result = convert(work, "qwen3", *args, short, ok=False)
    assert result.exit_code == 2 and "gives 5 tokens" in result.output and "at least 64" in result.output
    _, result = convert(work, "qwen3", *args, tmp_path / "missing.txt", ok=False)
    assert result.exit_code == 2 and "no such file" in result.output
    no_tokenizer = make_dense("qwen3", tmp_path / "bare")
    result = CliRunner().invoke(cli, ["convert", str(no_tokenizer), str(tmp_path / "o"), "-q", *map(str, args),
                                      work["text"]])
    assert result.exit_code == 2 and "tokenizer" in result.output


def test_calibration_folder_of_jsonl(work, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    lines = work["text"].read_text().splitlines()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines[:8]))
    (folder / "b.txt").write_text("\n".join(lines[8:]))
    out, _ = convert(work, "qwen3", "--method", "split", "-g", 2, "-e", 4, "-k", 2, "--split-strategy",
                     "activation", "--calibration", folder)
    assert logit_diff(work, "qwen3", out) <= EXACT_ATOL


# --- split on the other families' native targets (packed, fused and shared-MLP layouts) ----------
OTHER_FAMILIES = sorted(set(CONFIGS) - set(NATIVE))


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_split_is_exact_on_other_native_targets(tmp_path, family):
    dense = make_dense(family, tmp_path / "dense")
    out = tmp_path / "moe"
    result = CliRunner().invoke(cli, ["convert", str(dense), str(out), "-q", "--no-verify", "--method", "split",
                                      "-g", "2", "-e", "4", "-k", "2", "--split-strategy", "random"])
    assert result.exit_code == 0, result.output
    assert max_logit_diff(dense, out) <= EXACT_ATOL
