"""The command line around convert: --help without torch, --dry-run, --json, --recipe files, --quiet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checks import leftovers, run_cli
from factories import make_dense, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_dense("qwen3", tmp_path_factory.mktemp("cli") / "dense")


def test_python_m_upcycle_help():
    proc = subprocess.run([sys.executable, "-m", "upcycle", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("convert", "verify", "inspect"):
        assert command in proc.stdout


def test_help_does_not_import_torch():
    code = ("import sys, upcycle.cli\n"
            "from click.testing import CliRunner\n"
            "for args in ([], ['--help'], ['convert', '--help'], ['verify', '--help'], ['inspect', '--help'],"
            " ['--version']):\n"
            "    r = CliRunner().invoke(upcycle.cli.cli, args)\n"
            "    assert r.exit_code == 0 or (args == [] and r.exit_code == 2), (args, r.output)\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'huggingface_hub') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version():
    import upcycle

    result = run_cli("--version")
    assert result.exit_code == 0 and upcycle.__version__ in result.output


def test_convert_help_lists_every_option():
    text = run_cli("convert", "--help").output
    for option in ("--num-experts", "--top-k", "--method", "--target", "--router-init", "--router-std", "--seed",
                   "--dtype", "--max-shard-size", "--revision", "--recipe", "--force", "--dry-run", "--json", "--quiet"):
        assert option in text, option


def test_dry_run_writes_nothing(tmp_path, dense):
    out = tmp_path / "moe"
    result = run_cli("convert", dense, out, "-e", "4", "-k", "2", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert not out.exists() and leftovers(tmp_path) == []
    text = result.output
    assert "dry run, nothing written" in text
    assert "qwen3 -> Qwen3MoeForCausalLM (qwen3_moe)" in text
    assert "layers: 3/3 MoE" in text and "experts: 4 x 96" in text and "top-2" in text
    assert "total" in text and "active per token" in text and "output:" in text


def test_dry_run_json_matches_the_real_conversion(tmp_path, dense):
    out = tmp_path / "moe"
    dry = run_cli("convert", dense, out, "-e", "4", "-k", "1", "--dry-run", "--json", "-q")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert not out.exists()
    assert plan["dry_run"] is True and plan["output"] is None and plan["files"] == []
    assert plan["target"] == "qwen3_moe" and plan["num_experts"] == 4 and plan["top_k"] == 1
    assert plan["moe_layers"] == [0, 1, 2] and plan["exact"] is True

    real = run_cli("convert", dense, out, "-e", "4", "-k", "1", "--json", "-q")
    done = json.loads(real.stdout)
    for key in ("total_params", "active_params", "output_bytes", "shards", "expert_size", "dtype"):
        assert plan[key] == done[key], key
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert plan["output_bytes"] == weights


def test_dry_run_refuses_bad_recipe_but_not_existing_output(tmp_path, dense):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "x").write_text("x")
    assert run_cli("convert", dense, out, "--dry-run", "-q").exit_code == 0  # nothing would be written yet
    bad = run_cli("convert", dense, tmp_path / "o", "--dry-run", "-e", "2", "-k", "3", "-q")
    assert bad.exit_code != 0 and bad.output.startswith("error: --top-k")


def test_recipe_yaml_with_flag_overrides(tmp_path, dense):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"num_experts": 6, "top_k": 3, "router_init": "zeros", "seed": 4,
                                      "dtype": "bfloat16"}))
    out = tmp_path / "moe"
    result = run_cli("convert", dense, out, "--recipe", recipe, "--top-k", "2", "--dtype", "float32", "-q")
    assert result.exit_code == 0, result.output
    written = read_json(out / "upcycle_recipe.json")
    assert (written["num_experts"], written["top_k"], written["router_init"], written["seed"], written["dtype"]) == \
        (6, 2, "zeros", 4, "float32")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert (config.num_experts, config.num_experts_per_tok, str(config.dtype)) == (6, 2, "torch.float32")


def test_recipe_json_with_dashes(tmp_path, dense):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"num-experts": 3, "top-k": 1}))
    result = run_cli("convert", dense, tmp_path / "moe", "--recipe", recipe, "--dry-run", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["num_experts"], json.loads(result.stdout)["top_k"]) == (3, 1)


def test_quiet_hides_progress_bars(tmp_path, dense):
    loud = run_cli("convert", dense, tmp_path / "loud", "-e", "2", "-k", "1")
    quiet = run_cli("convert", dense, tmp_path / "quiet", "-e", "2", "-k", "1", "-q")
    assert loud.exit_code == quiet.exit_code == 0
    assert "Writing experts" in loud.stderr
    assert quiet.stderr == ""
