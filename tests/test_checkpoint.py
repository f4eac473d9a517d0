"""The checkpoint folder format (upcycle.checkpoint): torch-free, recipe text, weight-file listing, MoE keys."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from upcycle.checkpoint import (EXPERT_COUNT_KEYS, RECIPE_FILE, TOP_K_KEYS, expert_count, experts_per_token,
                                library_versions, read_recipe, recipe_text, weight_files, write_recipe)
from upcycle.errors import CorruptCheckpointError, HubError, IncompleteOutputError

ROOT = Path(__file__).resolve().parents[1]


def test_imports_neither_torch_nor_transformers():
    code = ("import sys, upcycle.checkpoint, upcycle.textdata, upcycle.hub_push, upcycle.inspection; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_recipe_text_round_trips(tmp_path):
    recipe, provenance = {"num_experts": 4, "top_k": 2, "method": "replicate"}, {"source": "x", "exact": True}
    assert recipe_text(recipe, provenance) == json.dumps({**recipe, "upcycle": provenance}, indent=2) + "\n"
    assert write_recipe(tmp_path, recipe, provenance) == RECIPE_FILE
    assert read_recipe(tmp_path) == {**recipe, "upcycle": provenance}
    assert read_recipe(tmp_path / "elsewhere") is None
    (tmp_path / RECIPE_FILE).write_text("{oops")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_recipe(tmp_path)


def test_weight_files_single_index_and_missing(tmp_path):
    assert weight_files(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    single = weight_files(tmp_path)
    assert single.files == ["model.safetensors"] and single.index is None and single.missing(tmp_path) == []
    index = {"metadata": {"total_size": 12}, "weight_map": {"b": "model-00002-of-00002.safetensors",
                                                            "a": "model-00001-of-00002.safetensors",
                                                            "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = weight_files(tmp_path)
    assert sharded.files == ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    assert sharded.total_size == 12 and sharded.weight_map == index["weight_map"]
    assert sharded.missing(tmp_path) == sharded.files
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(IncompleteOutputError, match="not a valid index"):
        weight_files(tmp_path, error=IncompleteOutputError)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert weight_files(tmp_path, single="pytorch_model.bin", index="pytorch_model.bin.index.json").files == [
        "pytorch_model.bin"]


@pytest.mark.parametrize("config,experts,top_k", [
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, 8, 2),  # mixtral
    ({"num_experts": 60, "num_experts_per_tok": 4}, 60, 4),  # qwen2_moe
    ({"moe_num_experts": 64, "moe_k": 6}, 64, 6),  # ernie4_5_moe
    ({"num_experts": 16, "moe_topk": [2, 2, 2]}, 16, 2),  # hunyuan_v1_moe: per-layer list
    ({"n_routed_experts": 32, "moe_top_k": 3}, 32, 3),
    ({"num_local_experts": 4, "top_k": 1}, 4, 1),
    ({"intermediate_size": 64}, None, None),  # dense
])
def test_moe_keys_from_a_dict_or_a_config_object(config, experts, top_k):
    assert set(EXPERT_COUNT_KEYS) >= {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}
    assert set(TOP_K_KEYS) >= {"num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "top_k"}
    for form in (config, SimpleNamespace(**config)):
        assert expert_count(form) == experts and experts_per_token(form) == top_k


def test_library_versions_are_the_installed_ones():
    import huggingface_hub
    import safetensors
    import torch
    import transformers

    import upcycle

    assert library_versions() == {"upcycle": upcycle.__version__, "torch": torch.__version__,
                                  "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                                  "huggingface_hub": huggingface_hub.__version__}


def test_hub_error_reason_and_hint():
    plain, hinted = HubError("no token"), HubError("push to a/b did not complete: HTTP 503", "run it again")
    assert str(plain) == "no token" and plain.reason == "no token" and plain.hint is None
    assert str(hinted) == "push to a/b did not complete: HTTP 503; run it again"
    assert hinted.reason == "push to a/b did not complete: HTTP 503"


def test_file_names_are_spelled_in_checkpoint_only():
    """The checkpoint folder's file names are constants of upcycle.checkpoint; code elsewhere uses them (error
    messages may name a file inside longer text). modeling/ is exempt: it ships alone as remote code."""
    import ast

    import upcycle.checkpoint as checkpoint

    names = {getattr(checkpoint, n): n for n in dir(checkpoint) if n.endswith("_FILE")}
    found = []
    for path in sorted((ROOT / "upcycle").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "upcycle/checkpoint.py" or rel.startswith("upcycle/modeling/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value!r} (checkpoint.{names[node.value]})")
    assert found == []
