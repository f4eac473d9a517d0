"""User mistakes and failures: one ``error:`` line, non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
from checks import assert_clean_error, fail_writes_after, leftovers, run_cli, tree_hashes
from factories import make_dense, read_json


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_dense("llama", tmp_path_factory.mktemp("llama") / "dense")


def _copy(dense: Path, folder: Path) -> Path:
    shutil.copytree(dense, folder)
    return folder


def convert(source, out, *args):
    return run_cli("convert", source, out, "-q", *args)


# --- the source ------------------------------------------------------------------------------------

def test_source_missing(tmp_path):
    out = tmp_path / "moe"
    assert_clean_error(convert(tmp_path / "nowhere", out), out, "nowhere", "no such folder")


def test_source_is_a_plain_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path / "moe"
    assert_clean_error(convert(tmp_path / "notes.txt", out), out, "notes.txt")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "moe"
    assert_clean_error(convert(tmp_path / "empty", out), out, "config.json")


def test_config_without_weights(tmp_path, llama):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copyfile(llama / "config.json", folder / "config.json")
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, "no weights")


def test_index_naming_missing_shard(tmp_path, llama):
    folder = _copy(llama, tmp_path / "src")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, "model-00002-of-00002.safetensors", "missing")


def test_unsupported_model_type_lists_supported(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=50)).save_pretrained(folder)
    out = tmp_path / "moe"
    line = assert_clean_error(convert(folder, out), out, "'bert'", "not supported")
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in line


# --- recipe values -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["--top-k", "0"], ["--top-k", "0"]),
    (["-e", "4", "-k", "5"], ["--top-k", "between 1 and the number of experts (4)"]),
    (["--num-experts", "0"], ["--num-experts", ">= 1"]),
    (["--num-experts", "-3", "-k", "1"], ["--num-experts"]),
    (["--method", "magic"], ["--method", "'magic'", "replicate"]),
    (["--router-init", "psychic"], ["--router-init", "'psychic'", "normal", "zeros"]),
    (["--router-std", "-1"], ["--router-std"]),
    (["--max-shard-size", "lots"], ["--max-shard-size", "'lots'", "5GB"]),
    (["--max-shard-size", "0"], ["--max-shard-size", "positive"]),
    (["--max-shard-size", "-2GB"], ["--max-shard-size"]),
    (["--target", "gpt_oss"], ["unknown target 'gpt_oss'", "mixtral"]),
])
def test_bad_recipe_values(tmp_path, llama, args, fragments):
    out = tmp_path / "moe"
    assert_clean_error(convert(llama, out, *args), out, *fragments)


def test_bad_dtype_is_a_usage_error(tmp_path, llama):
    out = tmp_path / "moe"
    result = convert(llama, out, "--dtype", "int8")
    assert result.exit_code == 2 and "Traceback" not in result.output and "'int8'" in result.output
    assert not out.exists()


def test_recipe_file_errors(tmp_path, llama):
    out = tmp_path / "moe"
    assert_clean_error(convert(llama, out, "--recipe", tmp_path / "none.yaml"), out, "recipe file not found")
    (tmp_path / "r.yaml").write_text("num_experts: 4\nexpert_count: 3\n")
    assert_clean_error(convert(llama, out, "--recipe", tmp_path / "r.yaml"), out, "unknown recipe key", "expert_count")
    (tmp_path / "bad.json").write_text("{not json")
    assert_clean_error(convert(llama, out, "--recipe", tmp_path / "bad.json"), out, "cannot parse recipe")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_clean_error(convert(llama, out, "--recipe", tmp_path / "list.yaml"), out, "mapping")
    (tmp_path / "k.yaml").write_text("num_experts: 2\ntop_k: 3\n")
    assert_clean_error(convert(llama, out, "--recipe", tmp_path / "k.yaml"), out, "--top-k")


# --- corrupt checkpoints ---------------------------------------------------------------------------

def test_garbage_safetensors_header(tmp_path, llama):
    folder = _copy(llama, tmp_path / "src")
    data = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    (folder / "model.safetensors").write_bytes(data[:8] + b"\x00garbage" * (header_len // 8 + 1) + data[8 + header_len:])
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, str(folder / "model.safetensors"))


def test_huge_header_length(tmp_path, llama):
    folder = _copy(llama, tmp_path / "src")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, "model.safetensors", "corrupt or truncated")


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(tmp_path, llama, keep):
    """Cut inside the length prefix, inside the header and inside the data: all name the file."""
    folder = _copy(llama, tmp_path / "src")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, str(path), "truncated")


def test_truncated_shard_in_index(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(folder, max_shard_size="100KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, shard.name, "truncated")


def test_corrupt_bin(tmp_path, llama):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copyfile(llama / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, "pytorch_model.bin")


def test_checkpoint_missing_mlp_tensor(tmp_path, llama):
    from safetensors.torch import load_file, save_file

    folder = _copy(llama, tmp_path / "src")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "moe"
    assert_clean_error(convert(folder, out), out, "model.layers.1.mlp.up_proj.weight")


# --- the output ----------------------------------------------------------------------------------

def test_output_exists_needs_force(tmp_path, llama):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hashes(out)
    result = convert(llama, out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == \
        [f"error: output folder {out} exists and is not empty; pass --force to replace it"]
    assert tree_hashes(out) == before and (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []

    result = convert(llama, out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_empty_output_folder_is_fine(tmp_path, llama):
    out = tmp_path / "moe"
    out.mkdir()
    assert convert(llama, out).exit_code == 0
    assert (out / "config.json").is_file()


def test_output_is_a_file(tmp_path, llama):
    out = tmp_path / "moe"
    out.write_text("x")
    result = convert(llama, out, "--force")
    assert result.exit_code != 0 and "is a file" in result.output and out.read_text() == "x"


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_would_replace_source(tmp_path, llama, where):
    source = _copy(llama, tmp_path / "models" / "dense")
    before = tree_hashes(source)
    out = source if where == "same" else source.parent
    result = convert(source, out, "--force")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "would replace the source" in result.output
    assert tree_hashes(source) == before
    assert leftovers(source.parent) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("overrides,target,reason", [
    ({"attention_bias": True}, "mixtral", "attention_bias"),
    ({"mlp_bias": True}, "mixtral", "mlp_bias"),
    ({}, "qwen2_moe", "does not take the 'llama' family"),
])
def test_target_that_cannot_express_llama(tmp_path, overrides, target, reason):
    dense = make_dense("llama", tmp_path / "dense", **overrides)
    out = tmp_path / "moe"
    assert_clean_error(convert(dense, out, "--target", target), out, f"--target {target}", reason)


def test_qwen3_mixed_sliding_layers_refused_by_qwen3_moe(tmp_path):
    dense = make_dense("qwen3", tmp_path / "dense", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert len(set(read_json(dense / "config.json")["layer_types"])) == 2
    out = tmp_path / "moe"
    assert_clean_error(convert(dense, out, "--target", "qwen3_moe"), out, "sliding")


def test_disk_full(tmp_path, llama, monkeypatch):
    fail_writes_after(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "moe"
    assert_clean_error(convert(llama, out), out, "No space left on device", "disk full", "nothing was written")


def test_disk_full_while_replacing_keeps_the_old_output(tmp_path, llama, monkeypatch):
    out = tmp_path / "moe"
    assert convert(llama, out, "-e", "2", "-k", "1").exit_code == 0
    before = tree_hashes(out)
    fail_writes_after(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    result = convert(llama, out, "--force")
    assert result.exit_code != 0 and "disk full" in result.output and "Traceback" not in result.output
    assert tree_hashes(out) == before
    assert leftovers(tmp_path) == []


def test_metadata_write_failure(tmp_path, llama, monkeypatch):
    import importlib

    convert_module = importlib.import_module("upcycle.convert")  # the module; ``upcycle.convert`` is the function

    def failing(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(convert_module, "render_card", failing)
    out = tmp_path / "moe"
    assert_clean_error(convert(llama, out), out, "Permission denied")


def test_python_api_raises_typed_errors(tmp_path, llama):
    import upcycle
    from upcycle.errors import OutputExistsError, RecipeError, SourceNotFoundError, UnsupportedArchitectureError

    with pytest.raises(SourceNotFoundError):
        upcycle.convert(tmp_path / "nowhere", tmp_path / "moe")
    with pytest.raises(RecipeError):
        upcycle.convert(llama, tmp_path / "moe", top_k=9)
    with pytest.raises(RecipeError, match="unknown option"):
        upcycle.convert(llama, tmp_path / "moe", num_expert=4)
    with pytest.raises(UnsupportedArchitectureError):
        upcycle.convert(llama, tmp_path / "moe", target="qwen3_moe")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        upcycle.convert(llama, tmp_path / "full")
    assert issubclass(SourceNotFoundError, upcycle.UpcycleError)
    assert not (tmp_path / "moe").exists() and leftovers(tmp_path) == []
