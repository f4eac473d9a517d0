"""Every kind of dense source converts to the same MoE: single and sharded safetensors, legacy
``pytorch_model.bin`` (single and sharded), and a Hub repo id read offline from the HF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import run_cli
from factories import EXACT_ATOL, cache_repo, make_dense, max_logit_diff, read_json, save_tiny_tokenizer
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
META = ("config.json", "generation_config.json")


def _state_dict(dense: Path) -> dict[str, torch.Tensor]:
    return load_file(dense / "model.safetensors")


def _copy_meta(dense: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in META:
        shutil.copyfile(dense / name, folder / name)
    return folder


def _sharded_safetensors(dense: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(dense).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    return folder


def _single_bin(dense: Path, folder: Path) -> Path:
    _copy_meta(dense, folder)
    torch.save(_state_dict(dense), folder / "pytorch_model.bin")
    return folder


def _sharded_bin(dense: Path, folder: Path) -> Path:
    _copy_meta(dense, folder)
    state = _state_dict(dense)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, keys in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in keys}, folder / file)
        weight_map.update({k: file for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


LAYOUTS = {"sharded-safetensors": _sharded_safetensors, "bin": _single_bin, "sharded-bin": _sharded_bin}


def _moe_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = set(read_json(index)["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(folder / file))
    return tensors


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _moe_tensors(a), _moe_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A dense llama in a single model.safetensors and its MoE."""
    root = tmp_path_factory.mktemp("ref")
    dense = make_dense("llama", root / "dense")
    result = run_cli("convert", dense, root / "moe", "-e", "4", "-k", "2", "-q")
    assert result.exit_code == 0, result.output
    return dense, root / "moe"


def test_single_safetensors(reference):
    dense, moe = reference
    assert sorted(p.name for p in dense.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert max_logit_diff(dense, moe) <= EXACT_ATOL


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_layouts_give_the_same_moe(tmp_path, reference, layout):
    dense, moe = reference
    source = LAYOUTS[layout](dense, tmp_path / layout)
    out = tmp_path / "moe"
    result = run_cli("convert", source, out, "-e", "4", "-k", "2", "-q")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(moe, out)
    assert max_logit_diff(dense, out) <= EXACT_ATOL


def test_stale_rotary_buffers_are_dropped(tmp_path, reference):
    """Old .bin checkpoints saved ``rotary_emb.inv_freq`` buffers; the MoE is the same without them."""
    dense, moe = reference
    folder = _copy_meta(dense, tmp_path / "old-bin")
    state = _state_dict(dense)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "moe"
    result = run_cli("convert", folder, out, "-e", "4", "-k", "2", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(moe, out)


def test_bin_is_loaded_with_weights_only(tmp_path, reference):
    """A pickle that runs code on load is refused (weights_only=True), naming the file."""
    dense, _ = reference
    folder = _copy_meta(dense, tmp_path / "evil")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    result = run_cli("convert", folder, tmp_path / "moe", "-q")
    assert result.exit_code != 0
    assert "pytorch_model.bin" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "moe").exists()


def test_safetensors_preferred_over_bin(tmp_path, reference):
    """With both formats present the .bin is never opened (here it is garbage and would fail)."""
    dense, moe = reference
    folder = tmp_path / "both"
    shutil.copytree(dense, folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    result = run_cli("convert", folder, tmp_path / "moe", "-e", "4", "-k", "2", "-q")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(moe, tmp_path / "moe")


# --- Hub repo ids, offline from a local cache ------------------------------------------------------

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, reference):
    """A cache with ``org/tiny-llama``: ``main`` holds safetensors and a (garbage) .bin, tag ``v1``
    another model with .bin weights only."""
    dense, _ = reference
    root = tmp_path_factory.mktemp("hub")
    main = root / "main"
    shutil.copytree(dense, main)
    save_tiny_tokenizer(main)
    (main / "pytorch_model.bin").write_bytes(b"never read")
    v1 = _single_bin(make_dense("llama", root / "other", seed=7), root / "v1")
    cache_repo(root / "cache", "org/tiny-llama", {SHA_MAIN: main, SHA_V1: v1}, {"main": SHA_MAIN, "v1": SHA_V1})
    return root / "cache", dense, root / "other"


@pytest.fixture
def offline_cache(monkeypatch, hub_cache):
    from huggingface_hub import constants

    cache = hub_cache[0]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_hub_repo_offline_subprocess(tmp_path, hub_cache):
    """The real CLI, in a fresh process with HF_HUB_CACHE and HF_HUB_OFFLINE=1 set, reads the cache."""
    cache, dense, _ = hub_cache
    out = tmp_path / "moe"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "upcycle", "convert", "org/tiny-llama", str(out), "-e", "4", "-q"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    provenance = read_json(out / "upcycle_recipe.json")["upcycle"]
    assert provenance["source"] == "org/tiny-llama" and provenance["source_commit"] == SHA_MAIN
    assert (out / "tokenizer.json").is_file()
    assert "base_model: org/tiny-llama" in (out / "README.md").read_text()
    assert max_logit_diff(dense, out) <= EXACT_ATOL


@pytest.mark.parametrize("revision,sha", [("v1", SHA_V1), (SHA_V1, SHA_V1), ("main", SHA_MAIN)])
def test_hub_revision(tmp_path, offline_cache, revision, sha):
    _, dense_main, dense_v1 = offline_cache
    out = tmp_path / "moe"
    result = run_cli("convert", "org/tiny-llama", out, "--revision", revision, "-e", "2", "-k", "1", "-q")
    assert result.exit_code == 0, result.output
    recipe = read_json(out / "upcycle_recipe.json")
    assert recipe["revision"] == revision and recipe["upcycle"]["source_commit"] == sha
    assert max_logit_diff(dense_v1 if sha == SHA_V1 else dense_main, out) <= EXACT_ATOL


def test_hub_asks_only_for_needed_files(monkeypatch, offline_cache):
    """Config, tokenizer and safetensors weights are requested, never the .bin of a safetensors repo."""
    import huggingface_hub

    from upcycle.io.hub import download

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append(kwargs.get("allow_patterns"))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert download("org/tiny-llama").name == SHA_MAIN
    assert len(calls) == 1
    assert "config.json" in calls[0] and "tokenizer.json" in calls[0] and "model.safetensors" in calls[0]
    assert not any(p.endswith(".bin") for p in calls[0])
    assert download("org/tiny-llama", revision="v1").name == SHA_V1  # .bin-only revision still found


@pytest.mark.parametrize("args,fragment", [
    (["org/not-cached"], "not in the local Hugging Face cache"),
    (["org/tiny-llama", "--revision", "nope"], "org/tiny-llama"),
])
def test_hub_offline_missing(tmp_path, offline_cache, args, fragment):
    from checks import assert_clean_error

    out = tmp_path / "moe"
    result = run_cli("convert", *args[:1], out, *args[1:], "-q")
    assert_clean_error(result, out, fragment)


def test_hub_dry_run_offline(tmp_path, offline_cache):
    """A dry run on a cached repo id works offline and downloads nothing."""
    result = run_cli("convert", "org/tiny-llama", tmp_path / "moe", "-e", "4", "--dry-run", "--json", "-q")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["target"] == "mixtral" and plan["num_experts"] == 4 and not (tmp_path / "moe").exists()
