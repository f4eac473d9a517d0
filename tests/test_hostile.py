"""Hostile and broken inputs (issue 13): never a false result, never a file from outside the source,
never a runaway allocation, nothing left behind, no private path published. One named test per case."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checks import assert_clean_error, leftovers, run_cli, tree_hashes
from factories import make_dense, read_json, save_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = make_dense("llama", tmp_path_factory.mktemp("hostile") / "dense")
    save_tiny_tokenizer(folder)
    return folder


def copy(dense: Path, folder: Path) -> Path:
    shutil.copytree(dense, folder)
    return folder


def convert(source, out, *args):
    return run_cli("convert", source, out, "-q", "--no-verify", *args)


def refused(source: Path, out: Path, *fragments: str, args=()) -> str:
    """A conversion refused with exit 2 and one error line, nothing written, the source unchanged."""
    before = tree_hashes(source) if Path(source).is_dir() else None
    result = convert(source, out, *args)
    assert result.exit_code == 2, result.output
    line = assert_clean_error(result, out, *fragments)
    if before is not None:
        assert tree_hashes(source) == before
    return line


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: Path, header, data: bytes) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def mutate_header(folder: Path, mutate) -> None:
    path = folder / "model.safetensors"
    header, data = header_of(path)
    result = mutate(header, data)
    header, data = result if isinstance(result, tuple) else (header, data)
    write_safetensors(path, header, data)


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# --- 1. false results: non-finite options, malformed headers, incomplete checkpoints ----------------

@pytest.mark.parametrize("args,fragment", [
    (["--router-std", "nan"], "--router-std"),
    (["--router-std", "inf"], "--router-std"),
    (["--noise-std", "nan"], "--noise-std"),
    (["--noise-std", "inf"], "--noise-std"),
    (["--method", "drop", "--drop-ratio", "nan"], "--drop-ratio"),
    (["--max-shard-size", "inf"], "--max-shard-size"),
    (["--max-shard-size", "nan"], "--max-shard-size"),
    (["--seed", str(2**70)], "--seed"),
])
def test_non_finite_or_out_of_range_option_refused(tmp_path, llama, args, fragment):
    refused(llama, tmp_path / "moe", fragment, args=args)


def test_seed_not_an_integer_is_a_usage_error(tmp_path, llama):
    result = convert(llama, tmp_path / "moe", "--seed", "1e23")
    assert result.exit_code == 2 and "Traceback" not in result.output and "--seed" in result.output
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("text", ["router_std: .nan\n", "noise_std: .inf\n", "router_std: -.inf\n"])
def test_non_finite_recipe_value_refused(tmp_path, llama, text):
    (tmp_path / "r.yaml").write_text(text)
    refused(llama, tmp_path / "moe", "finite", args=["--recipe", tmp_path / "r.yaml"])


def test_json_recipe_with_nan_literal_refused(tmp_path, llama):
    (tmp_path / "r.json").write_text('{"router_std": NaN}')
    refused(llama, tmp_path / "moe", "NaN", args=["--recipe", tmp_path / "r.json"])


def test_recipe_file_is_strict_json(tmp_path, llama):
    from upcycle.checkpoint import recipe_text

    out = tmp_path / "moe"
    assert convert(llama, out, "-e", "2", "-k", "1").exit_code == 0

    def no_constants(name):
        raise AssertionError(f"{name} literal in upcycle_recipe.json")

    json.loads((out / "upcycle_recipe.json").read_text(), parse_constant=no_constants)
    with pytest.raises(ValueError):
        recipe_text({"router_std": float("nan")}, {})


@pytest.mark.parametrize("case,mutate,fragment", [
    ("negative_shape", lambda h, d: h[first_tensor(h)].update(shape=[-96, -64]), "shape"),
    ("float_shape", lambda h, d: h[first_tensor(h)].update(shape=[96.0, 64]), "shape"),
    ("infinite_dimension", None, "shape"),
    ("bool_dimension", lambda h, d: h[first_tensor(h)].update(shape=[True, 64]), "shape"),
    ("negative_offsets", None, "data_offsets"),
    ("overlapping_offsets", None, "overlaps"),
    ("gap_in_offsets", None, "gap"),
    ("trailing_bytes", lambda h, d: (h, d + b"\0" * 64), "after the last tensor"),
    ("unknown_dtype", lambda h, d: h[first_tensor(h)].update(dtype="F128"), "dtype"),
    ("metadata_not_strings", lambda h, d: h.update(__metadata__={"format": 1}), "__metadata__"),
])
def test_malformed_header_refused(tmp_path, llama, case, mutate, fragment):
    folder = copy(llama, tmp_path / "src")
    path = folder / "model.safetensors"
    header, data = header_of(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if case == "infinite_dimension":
        body = json.dumps(header).replace(json.dumps(header[names[0]]["shape"]), "[1e400, 64]", 1).encode()
        write_safetensors(path, body, data)
    elif case == "negative_offsets":
        size = header[names[0]]["data_offsets"][1]
        header[names[0]]["data_offsets"] = [-size, 0]
        write_safetensors(path, header, data)
    elif case == "overlapping_offsets":  # the second tensor claims the first one's bytes too
        a, b = header[names[0]], header[names[1]]
        a_end = a["data_offsets"][1]
        a["data_offsets"] = [0, a_end]
        b_len = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a_end - 8, a_end - 8 + b_len]
        write_safetensors(path, header, data)
    elif case == "gap_in_offsets":
        del header[names[1]]
        write_safetensors(path, header, data)
    else:
        mutate_header(folder, mutate)
    line = refused(folder, tmp_path / "moe", str(path), fragment)
    assert "write" not in line.lower()


def test_header_that_is_a_json_list_refused(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    _, data = header_of(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", b"[1, 2, 3]", data)
    refused(folder, tmp_path / "moe", "model.safetensors", "not an object")


def test_header_with_duplicate_key_refused(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    header, data = header_of(folder / "model.safetensors")
    name = first_tensor(header)
    body = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    write_safetensors(folder / "model.safetensors", body.encode(), data)
    refused(folder, tmp_path / "moe", name, "twice")


def _shard(llama: Path, folder: Path) -> dict[str, str]:
    """Split the single file into two shards with an index; returns the weight map."""
    from safetensors.torch import load_file, save_file

    state = load_file(llama / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_tensor_duplicated_across_shards_refused(tmp_path, llama):
    from safetensors.torch import load_file, save_file

    folder = copy(llama, tmp_path / "src")
    weight_map = _shard(llama, folder)
    first = folder / "model-00001-of-00002.safetensors"
    second = load_file(folder / "model-00002-of-00002.safetensors")
    stolen = next(k for k, f in weight_map.items() if f == first.name)
    second[stolen] = load_file(first)[stolen] * 0  # a second, different copy: which one wins?
    save_file(second, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    refused(folder, tmp_path / "moe", stolen, "twice")


def test_shard_disagreeing_with_index_refused(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    weight_map = _shard(llama, folder)
    name = next(iter(weight_map))
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    weight_map[name] = other[weight_map[name]]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, tmp_path / "moe", name, "index")


def test_sharded_checkpoint_still_converts(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    _shard(llama, folder)
    assert convert(folder, tmp_path / "moe", "-e", "2", "-k", "1").exit_code == 0


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight",
                                    "model.layers.2.input_layernorm.weight"])
def test_checkpoint_missing_a_tensor_the_model_needs_refused(tmp_path, llama, tensor):
    from safetensors.torch import load_file, save_file

    folder = copy(llama, tmp_path / "src")
    state = load_file(folder / "model.safetensors")
    del state[tensor]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    refused(folder, tmp_path / "moe", tensor, "needs")


@pytest.mark.parametrize("key,value,tensor", [("intermediate_size", 128, "mlp"), ("vocab_size", 100, "embed"),
                                              ("hidden_size", 128, "model.")])
def test_shape_mismatch_with_config_is_a_clear_error(tmp_path, llama, key, value, tensor):
    folder = copy(llama, tmp_path / "src")
    config = read_json(folder / "config.json")
    config[key] = value
    if key == "hidden_size":
        config["head_dim"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    line = refused(folder, tmp_path / "moe", "shape", tensor)
    assert "internal error" not in line


# --- 2. never outside the source ---------------------------------------------------------------------

@pytest.fixture
def private_model(tmp_path, llama) -> Path:
    """Someone else's model elsewhere on the machine."""
    return copy(llama, tmp_path / "home" / "alice" / "private")


@pytest.mark.parametrize("how", ["absolute", "dotdot", "dotdot_nested"])
def test_index_pointing_outside_the_folder_refused(tmp_path, llama, private_model, how):
    folder = tmp_path / "hostile"
    folder.mkdir()
    shutil.copyfile(llama / "config.json", folder / "config.json")
    target = {"absolute": str(private_model / "model.safetensors"),
              "dotdot": "../home/alice/private/model.safetensors",
              "dotdot_nested": "sub/../../home/alice/private/model.safetensors"}[how]
    header, _ = header_of(private_model / "model.safetensors")
    weight_map = {k: target for k in header if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, tmp_path / "moe", "outside the model folder")
    result = run_cli("inspect", folder)
    assert result.exit_code == 2 and "outside the model folder" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("which", ["shard", "single"])
def test_symlink_to_a_file_outside_the_folder_refused(tmp_path, llama, private_model, which):
    folder = tmp_path / "hostile"
    folder.mkdir()
    shutil.copyfile(llama / "config.json", folder / "config.json")
    if which == "single":
        (folder / "model.safetensors").symlink_to(private_model / "model.safetensors")
    else:
        (folder / "model-00001-of-00001.safetensors").symlink_to(private_model / "model.safetensors")
        header, _ = header_of(private_model / "model.safetensors")
        weight_map = {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, tmp_path / "moe", "outside the model folder")


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json", "config.json"])
def test_metadata_file_linking_outside_the_folder_refused(tmp_path, llama, name):
    """A tokenizer (or config) file that links to a private file would be copied into a published output."""
    secret = tmp_path / "home" / "alice" / ".ssh" / "secret.json"
    secret.parent.mkdir(parents=True)
    secret.write_text((llama / name).read_text())
    folder = copy(llama, tmp_path / "hostile")
    (folder / name).unlink()
    (folder / name).symlink_to(secret)
    refused(folder, tmp_path / "moe", name, "outside the model folder")


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": ["a"]}, {"weight_map": {"model.norm.weight": 3}},
                                   {"weight_map": {"model.norm.weight": None}}, "not an index"])
def test_malformed_index_refused(tmp_path, llama, index):
    folder = copy(llama, tmp_path / "src")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, tmp_path / "moe", "model.safetensors.index.json")


# --- 3. never exhausting the machine -------------------------------------------------------------------

def test_huge_layer_count_refused_before_anything_is_sized(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    config = read_json(folder / "config.json")
    config["num_hidden_layers"] = 1_000_000_000
    (folder / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    refused(folder, tmp_path / "moe", "num_hidden_layers", "1000000000", "3 decoder layer")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("key", ["layers", "extra"])
def test_yaml_alias_bomb_refused(tmp_path, llama, key):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for level, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[level]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    lines.append(f"{key}: [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    refused(llama, tmp_path / "moe", "aliases", args=["--recipe", tmp_path / "bomb.yaml"])


def test_deeply_nested_yaml_refused(tmp_path, llama):
    (tmp_path / "deep.yaml").write_text("extra: " + "[" * 20000 + "]" * 20000 + "\n")
    refused(llama, tmp_path / "moe", "deep.yaml", args=["--recipe", tmp_path / "deep.yaml"])


def test_yaml_loader_is_public_for_other_config_files():
    from upcycle.errors import DataError
    from upcycle.io.yaml_load import load_yaml_text

    assert load_yaml_text("a: &x 1\nb: 2\n", "merge config") == {"a": 1, "b": 2}  # an anchor alone is fine
    with pytest.raises(DataError, match="merge config"):
        load_yaml_text("a: &x 1\nb: *x\n", "merge config", DataError)


def test_free_space_checked_before_writing(tmp_path, llama, monkeypatch):
    import upcycle.io.atomic as atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10_000_000)
    out = tmp_path / "moe"
    line = refused(llama, out, "not enough free space", "10000000 bytes", "--num-experts", args=["-e", "64"])
    assert "nothing was written" in line


@pytest.fixture
def planned(monkeypatch) -> list[int]:
    """The expert count of every plan convert makes (``make_plan`` patched where convert looks it up)."""
    convert_module = importlib.import_module("upcycle.convert")  # the module; ``upcycle.convert`` is the function
    counts: list[int] = []
    real = convert_module.make_plan

    def counting(config, infos, recipe, *args, **kwargs):
        counts.append(recipe.num_experts)
        return real(config, infos, recipe, *args, **kwargs)

    monkeypatch.setattr(convert_module, "make_plan", counting)
    return counts


def test_huge_expert_count_refused_for_space_before_it_is_planned(tmp_path, llama, monkeypatch, planned):
    import upcycle.io.atomic as atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10**9)
    start = time.monotonic()
    line = refused(llama, tmp_path / "moe", "not enough free space", args=["-e", "1000000", "-k", "2"])
    assert time.monotonic() - start < 30 and max(planned) <= 3, planned  # only the two small plans were made
    need = int(line.split("needs about ")[1].split("(")[1].split(" bytes")[0])
    assert need > 10**9


@pytest.mark.parametrize("args", [dict(num_experts=300, top_k=2),
                                  dict(num_experts=300, top_k=3, method="split", granularity=4, shared_experts=1),
                                  dict(num_experts=301, top_k=1, max_shard_size="200KB")])
def test_output_size_estimate_matches_the_plan(llama, args):
    from upcycle.convert import build_recipe, estimate_summary
    from upcycle.io import open_source
    from upcycle.plan import make_plan

    src = open_source(str(llama))
    config, recipe = src.load_config(), build_recipe(None, **args)
    actual = make_plan(config, src.infos, recipe).summary()["output_bytes"]
    estimate = estimate_summary(config, src.infos, recipe)["output_bytes"]
    assert abs(estimate - actual) <= 64 * 1024 and abs(estimate - actual) / actual < 0.001, (estimate, actual)


def test_huge_layer_range_refused(tmp_path, llama):
    start = time.monotonic()
    refused(llama, tmp_path / "moe", "--layers", "no layer 3", args=["--layers", "0-1000000000000000"])
    assert time.monotonic() - start < 30


# --- 4. one line instead of a traceback ------------------------------------------------------------------

@pytest.mark.parametrize("case,text,fragment", [
    ("not_json", "{not json", "not valid JSON"),
    ("a_list", "[1, 2, 3]", "JSON object"),
    ("no_model_type", None, "model_type"),
    ("unknown_model_type", None, "frobnicator"),
    ("string_size", None, "'hidden_size'"),
    ("zero_size", None, "'intermediate_size'"),
    ("float_size", None, "'num_attention_heads'"),
    ("bool_size", None, "'vocab_size'"),
])
def test_broken_config_is_one_line(tmp_path, llama, case, text, fragment):
    folder = copy(llama, tmp_path / "src")
    config = read_json(folder / "config.json")
    if text is None:
        if case == "no_model_type":
            del config["model_type"]
        elif case == "unknown_model_type":
            config["model_type"] = "frobnicator"
        elif case == "string_size":
            config["hidden_size"] = "64"
        elif case == "zero_size":
            config["intermediate_size"] = 0
        elif case == "float_size":
            config["num_attention_heads"] = 4.0
        elif case == "bool_size":
            config["vocab_size"] = True
        text = json.dumps(config)
    (folder / "config.json").write_text(text)
    refused(folder, tmp_path / "moe", fragment)
    result = run_cli("inspect", folder)  # inspect reads configs of any model_type; the rest is one error line
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    if case != "unknown_model_type":
        assert result.exit_code == 2 and result.output.startswith("error:"), result.output


@pytest.mark.parametrize("text,fragment", [
    ('num_experts: "8"\n', "'num_experts'"),
    ("top_k: 1.5\n", "'top_k'"),
    ("router_std: abc\n", "'router_std'"),
    ("method: 3\n", "--method"),
    ('method: split\ngranularity: "4"\n', "--granularity"),
    ("method: drop\ndrop_ratio: .nan\n", "--drop-ratio"),
    ("revision: [1]\n", "'revision'"),
    ("allow_inexact: maybe\n", "'allow_inexact'"),
    ("max_shard_size: [5]\n", "'max_shard_size'"),
    ("calibration: 7\n", "'calibration'"),
    ("seed: 1.0e+23\n", "'seed'"),
    ("1: 2\n", "key"),
])
def test_recipe_value_of_wrong_type_names_the_field(tmp_path, llama, text, fragment):
    (tmp_path / "r.yaml").write_text(text)
    refused(llama, tmp_path / "moe", fragment, args=["--recipe", tmp_path / "r.yaml"])


def test_binary_recipe_file_refused(tmp_path, llama):
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe\x00\x01garbage")
    refused(llama, tmp_path / "moe", "UTF-8", args=["--recipe", tmp_path / "r.yaml"])


def test_binary_prompt_file_refused(tmp_path, llama):
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe\x00\x01\x80\x81")
    result = run_cli("verify", llama, llama, "--prompts", tmp_path / "prompts.txt", "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == \
        [f"error: {tmp_path / 'prompts.txt'}: binary data (it holds NUL bytes), not text; pass a text or JSONL file"]


@pytest.mark.parametrize("breakage", ["config_not_json", "recipe_not_json", "recipe_a_list", "index_a_list",
                                      "header_truncated", "header_a_list", "architectures_a_dict",
                                      "text_config_a_list", "top_k_a_string"])
def test_inspect_on_a_broken_folder_is_one_line(tmp_path, llama, breakage):
    out = tmp_path / "moe"
    assert convert(llama, out, "-e", "2", "-k", "1").exit_code == 0
    config = read_json(out / "config.json")
    if breakage == "config_not_json":
        (out / "config.json").write_text("{")
    elif breakage == "recipe_not_json":
        (out / "upcycle_recipe.json").write_text("{")
    elif breakage == "recipe_a_list":
        (out / "upcycle_recipe.json").write_text("[]")
    elif breakage == "index_a_list":
        (out / "model.safetensors.index.json").write_text("[]")
    elif breakage == "header_truncated":
        (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:20])
    elif breakage == "header_a_list":
        _, data = header_of(out / "model.safetensors")
        write_safetensors(out / "model.safetensors", b"[]", data)
    elif breakage == "architectures_a_dict":
        (out / "config.json").write_text(json.dumps({**config, "architectures": {"a": 1}}))
    elif breakage == "top_k_a_string":  # was described as 'top-2' (exit 0); MoE fields are now checked
        (out / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": "2"}))
    elif breakage == "text_config_a_list":
        (out / "config.json").write_text(json.dumps({**config, "text_config": [1], "num_hidden_layers": None}))
    result = run_cli("inspect", out)
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    if breakage in ("architectures_a_dict", "text_config_a_list"):
        assert result.exit_code == 0, result.output  # odd but readable: described as far as it can be
    else:
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("error:")


# --- 5. debris and races ------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    from upcycle.io.atomic import _host

    return _host()


def test_dead_runs_leftovers_removed_and_reported(tmp_path, llama):
    out = tmp_path / "moe"
    pid = _dead_pid()
    debris = tmp_path / f".moe.upcycle-tmp-{pid}-{_host()}-0123abcd"
    debris.mkdir()
    (debris / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / ".moe.upcycle-lock").write_text(f"{pid} {_host()}\n")
    other = tmp_path / f".other.upcycle-tmp-{pid}-{_host()}-0123abcd"  # another output's: not ours to judge
    other.mkdir()
    result = convert(llama, out, "-e", "2", "-k", "1")
    assert result.exit_code == 0, result.output
    assert f"removed {debris.name} (4.1 KB) left by an interrupted upcycle run (pid {pid})" in result.output
    assert "removed the lock of an interrupted upcycle run" in result.output
    assert not debris.exists() and other.exists() and leftovers(tmp_path) == [other.name]


def test_live_runs_temporary_folder_is_left_alone(tmp_path, llama):
    live = tmp_path / f".moe.upcycle-tmp-{os.getpid()}-{_host()}-0123abcd"
    live.mkdir()
    other_host = tmp_path / f".moe.upcycle-tmp-{_dead_pid()}-elsewhere.example-0123abcd"
    other_host.mkdir()
    assert convert(llama, tmp_path / "moe", "-e", "2", "-k", "1").exit_code == 0
    assert live.exists() and other_host.exists()


@pytest.fixture(scope="module")
def big_dense(tmp_path_factory) -> Path:
    """About 25 MB of dense FFN weights; with 8 experts the output is about 200 MB in 10 MB shards."""
    return make_dense("llama", tmp_path_factory.mktemp("big") / "dense", hidden_size=128, intermediate_size=8192,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def _start_slow_conversion(source: Path, out: Path) -> subprocess.Popen:
    """A conversion in another process, returned once it has written its first shard."""
    proc = subprocess.Popen([sys.executable, "-m", "upcycle", "convert", str(source), str(out), "-e", "8", "-k", "2",
                             "--max-shard-size", "10MB", "-q", "--no-verify"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = list(out.parent.glob(f".{out.name}.upcycle-tmp-*"))
        if tmp and len(list(tmp[0].glob("model-*.safetensors"))) >= 2:
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"conversion ended before it could be observed: {proc.communicate()}")


def test_sigkilled_runs_debris_removed_by_the_next_run(tmp_path, big_dense):
    out = tmp_path / "moe"
    proc = _start_slow_conversion(big_dense, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    debris = leftovers(tmp_path)
    assert any(".upcycle-tmp-" in name for name in debris) and not out.exists()
    result = run_cli("convert", big_dense, out, "-e", "2", "-k", "1", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    tmp_name = next(name for name in debris if ".upcycle-tmp-" in name)
    assert f"removed {tmp_name} (" in result.output and f"(pid {proc.pid})" in result.output
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_two_runs_cannot_claim_one_output(tmp_path, big_dense, llama):
    out = tmp_path / "moe"
    first = _start_slow_conversion(big_dense, out)
    try:
        result = convert(llama, out, "-e", "2", "-k", "1")
        assert result.exit_code == 2 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "another upcycle run" in errors[0] and f"pid {first.pid}" in errors[0]
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert read_json(out / "upcycle_recipe.json")["num_experts"] == 8  # the first run's output, intact
    assert leftovers(tmp_path) == []


def test_force_over_a_symlink_leaves_nothing(tmp_path, llama):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = tmp_path / "moe"
    out.symlink_to(target)
    result = convert(llama, out, "-e", "2", "-k", "1", "--force")
    assert result.exit_code == 0, result.output
    assert not out.is_symlink() and (out / "config.json").is_file()
    assert (target / "keep.txt").read_text() == "mine"  # the link is replaced, what it pointed to is not touched
    assert leftovers(tmp_path) == []


# --- 6. no private path published -----------------------------------------------------------------------

def test_published_files_hold_no_local_path(tmp_path, llama):
    source = copy(llama, tmp_path / "home" / "alice" / "secret-project" / "dense-llama")
    text = tmp_path / "home" / "alice" / "notes" / "calibration.txt"
    text.parent.mkdir(parents=True)
    text.write_text(" ".join(["the cat is on the mat and it was a dog"] * 200))
    out = tmp_path / "moe"
    result = convert(source, out, "-e", "4", "-k", "2", "--router-init", "kmeans", "--calibration", text)
    assert result.exit_code == 0, result.output
    recipe = read_json(out / "upcycle_recipe.json")
    assert recipe["upcycle"]["source"] == "dense-llama" and recipe["calibration"] == "calibration.txt"
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"alice" not in data and str(tmp_path).encode() not in data, path.name


# --- 7. smaller ---------------------------------------------------------------------------------------

def test_output_inside_the_source_refused(tmp_path, llama):
    source = copy(llama, tmp_path / "dense")
    refused(source, source / "moe", "inside the source")
    assert not (source / "moe").exists()


def test_pickle_refusal_does_not_advise_weights_only_false(tmp_path, llama):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copyfile(llama / "config.json", folder / "config.json")
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    line = refused(folder, tmp_path / "moe", "pytorch_model.bin", "refused", "weights_only=True")
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_index_in_gguf_folder_output_next_to_gguf_is_fine(tmp_path):
    """A .gguf source's folder is not the source: an output beside the file is allowed."""
    from upcycle.io.atomic import check_output

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    check_output(tmp_path / "moe", False, tmp_path / "m.gguf")
    with pytest.raises(Exception, match="replace the source"):
        check_output(tmp_path, True, tmp_path / "m.gguf")


def test_hostname_in_temp_names_is_safe():
    from upcycle.io.atomic import _LEFTOVER, _run_tag

    tag = _run_tag()
    assert _LEFTOVER.search(f".moe.upcycle-tmp-{tag}-0123abcd")["pid"] == str(os.getpid())
    assert socket.gethostname()  # the tag names this host


# --- found by the audit of 2026-12-02 --------------------------------------------------------------

def test_merge_config_alias_bomb_refused(tmp_path, llama):
    """A merge config is read like a recipe: a YAML alias bomb under a known key is refused at once (it was a
    MemoryError traceback after 85 s and 2.1 GB under a 3 GB cap)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    config = tmp_path / "merge.yaml"
    config.write_text("base_model: &x\n" + "\n".join("  " + line for line in lines)
                      + f"\ntop_k: *x\nexperts: [{{source: {llama}}}]\n")
    out = tmp_path / "moe"
    result = run_cli("merge", config, out)
    assert result.exit_code == 2, result.output
    assert "aliases (*name) are not allowed" in assert_clean_error(result, out, "merge config")


def test_config_field_transformers_refuses_is_one_line(tmp_path, llama):
    """A config field of a type transformers' strict dataclasses refuse (rope_parameters: "x") was a
    StrictDataclassFieldValidationError traceback."""
    source = copy(llama, tmp_path / "dense")
    config = read_json(source / "config.json")
    config["rope_parameters"] = "x"
    (source / "config.json").write_text(json.dumps(config))
    refused(source, tmp_path / "moe", "rope_parameters", "transformers cannot read this config")


@pytest.mark.parametrize("args", [["--atol", "nan"], ["--atol", "inf"], ["--atol", "-1"], ["--memory-budget", "nan"],
                                  ["--memory-budget", "inf"]])
def test_verify_non_finite_option_refused(llama, args):
    """verify --memory-budget nan/inf was a ValueError/OverflowError traceback; --atol inf passed anything."""
    result = run_cli("verify", llama, llama, "-q", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {args[0]} must be a finite number >= 0, got {float(args[1])}"], result.output


def test_option_value_alias_bomb_refused(tmp_path, llama):
    """-o values are read without YAML aliases (a short alias bomb was a MemoryError traceback after 85 s)."""
    names = "abcdefgh"
    parts = ["&a [1,1,1,1,1,1,1,1,1]"] + [f"&{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip(names, names[1:])]
    bomb = "[" + ", ".join(parts) + ", [" + ",".join(["*h"] * 9) + "]]"
    line = refused(llama, tmp_path / "moe", "--option layers", "aliases (*name) are not allowed", args=("-o", f"layers={bomb}"))
    assert line.startswith("error: --option layers:")


def test_option_value_that_is_not_yaml_is_kept_as_text():
    from upcycle.cli_common import parse_options

    assert parse_options(("a=4", "b=0.5", "c=true", "d=[1, 2]", "e=x: y: z", "f=")) == {
        "a": 4, "b": 0.5, "c": True, "d": [1, 2], "e": "x: y: z", "f": None}


# --- gaps found by the audit of issue 13 (helper h13) -------------------------------------------------

@pytest.fixture(scope="module")
def small_moe(tmp_path_factory, llama) -> Path:
    out = tmp_path_factory.mktemp("hostile_moe") / "moe"
    assert convert(llama, out, "-e", "4", "-k", "2").exit_code == 0
    return out


@pytest.mark.parametrize("args,line", [
    (["--epochs", "nan"], "error: --epochs must be a finite number, got nan"),
    (["--epochs", "inf"], "error: --epochs must be a finite number, got inf"),
    (["--lr", "nan"], "error: --learning-rate must be a finite number, got nan"),
    (["--learning-rate", "-inf"], "error: --learning-rate must be a finite number, got -inf"),
    (["--z-loss-coef", "inf"], "error: --z-loss-coef must be a finite number, got inf"),
    (["--aux-loss-coef", "nan"], "error: --aux-loss-coef must be a finite number, got nan"),
    (["--aux-loss-coef", "-0.5"], "error: --aux-loss-coef must be >= 0"),
])
def test_train_non_finite_option_refused(tmp_path, small_moe, args, line):
    """train --epochs nan/inf, --lr nan, --z-loss-coef inf, --aux-loss-coef nan were tracebacks (or a silent run)
    that left the output folder behind."""
    (tmp_path / "data.txt").write_text("the a of to and in is it that was\n" * 50)
    before = tree_hashes(small_moe)
    out = tmp_path / "trained"
    result = run_cli("train", small_moe, "--data", tmp_path / "data.txt", "-o", out, "-q", "--seq-len", "16", *args)
    assert result.exit_code == 2, result.output
    assert assert_clean_error(result, out) == line
    assert tree_hashes(small_moe) == before


@pytest.mark.parametrize("name", ["epochs", "learning_rate", "z_loss_coef", "aux_loss_coef", "weight_decay"])
def test_train_options_validate_refuses_non_finite_floats(name):
    from upcycle.errors import RecipeError
    from upcycle.train.run import TrainOptions

    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(RecipeError, match=f"--{name.replace('_', '-')} must be a finite number"):
            TrainOptions(**{name: value}).validate()


@pytest.mark.parametrize("fields,line_end", [
    ({"num_experts_per_tok": 99}, "'num_experts_per_tok' is 99, more experts per token than 'num_local_experts' (4); "
                                  "set it to at most 4"),
    ({"num_local_experts": 0}, "'num_local_experts' must be an integer >= 1 (or a list of them), got 0"),
    ({"num_experts_per_tok": 0}, "'num_experts_per_tok' must be an integer >= 1 (or a list of them), got 0"),
    ({"num_local_experts": 4.0}, "'num_local_experts' must be an integer >= 1 (or a list of them), got 4.0"),
])
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_moe_config_expert_fields_checked(tmp_path, llama, small_moe, fields, line_end, command):
    """inspect printed 'top-99' with more active than total parameters, or 'experts: None x 96'; verify was a
    'selected index k out of range' traceback."""
    folder = copy(small_moe, tmp_path / "moe")
    (folder / "config.json").write_text(json.dumps({**read_json(folder / "config.json"), **fields}))
    args = ("inspect", folder) if command == "inspect" else ("verify", llama, folder, "-q")
    result = run_cli(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {folder / 'config.json'}: {line_end}"], result.output
    if command == "inspect":
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_dense_config_with_a_generation_top_k_is_not_an_moe_config(tmp_path, llama):
    from upcycle.io.config_check import check_config_dict

    check_config_dict({"model_type": "llama", "top_k": 50}, "config.json")  # no expert count: not checked
    with pytest.raises(Exception, match="'top_k' is 50"):
        check_config_dict({"model_type": "llama", "num_experts": 8, "top_k": 50}, "config.json")
    check_config_dict({"model_type": "upcycle_moe", "text_config": {"num_local_experts": 4, "num_experts_per_tok": [2, 2]}},
                      "config.json")
    with pytest.raises(Exception, match="'text_config.num_experts_per_tok' is \\[2, 5\\]"):
        check_config_dict({"model_type": "upcycle_moe", "text_config": {"num_local_experts": 4,
                                                                         "num_experts_per_tok": [2, 5]}}, "config.json")


def test_huge_expert_count_dry_run_is_estimated_without_planning_every_expert(tmp_path, llama, planned):
    """convert --dry-run -e 100000 planned every expert (77 s, 1.5 GB; a recipe with 10000000 experts would
    exhaust memory). Now it reports the sizes from two small plans, in bounded time and memory."""
    out = tmp_path / "moe"
    result = run_cli("convert", llama, out, "-q", "--dry-run", "--json", "-e", "100000", "-k", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert max(planned) <= 3 and not out.exists(), planned
    assert summary["estimated"] and summary["num_experts"] == 100000 and summary["dry_run"]
    small = json.loads(run_cli("convert", llama, out, "-q", "--dry-run", "--json", "-e", "300", "-k", "2").stdout)
    per_expert = (summary["output_bytes"] - small["output_bytes"]) / (100000 - 300)
    assert per_expert > 0 and summary["output_bytes"] > 10**9
    assert summary["shards"] >= summary["output_bytes"] // (5 * 10**9)


def test_dry_run_refuses_what_the_real_run_would_refuse_for_space(tmp_path, llama, monkeypatch):
    import upcycle.io.atomic as atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10_000_000)
    for experts in ("64", "10000000"):
        start = time.monotonic()
        refused(llama, tmp_path / "moe", "not enough free space", "(10000000 bytes) free",
                args=["-e", experts, "-k", "2", "--dry-run"])
        assert time.monotonic() - start < 30


def test_estimated_summary_matches_the_plan(llama):
    from upcycle.convert import build_recipe, estimate_summary
    from upcycle.io import open_source
    from upcycle.plan import make_plan

    src = open_source(str(llama))
    config, recipe = src.load_config(), build_recipe(None, num_experts=301, top_k=2, max_shard_size="200KB")
    actual, estimate = make_plan(config, src.infos, recipe).summary(), estimate_summary(config, src.infos, recipe)
    assert estimate.pop("estimated") is True
    assert {k: v for k, v in estimate.items() if k not in ("output_bytes", "shards")} == \
        {k: v for k, v in actual.items() if k not in ("output_bytes", "shards")}
    assert abs(estimate["output_bytes"] - actual["output_bytes"]) / actual["output_bytes"] < 0.001
    assert actual["shards"] * 0.9 <= estimate["shards"] <= actual["shards"]


def test_absolute_index_path_inside_the_folder_is_worded_right(tmp_path, llama):
    """An absolute weight_map path that lies inside the folder was refused as 'points outside the model folder'."""
    folder = copy(llama, tmp_path / "src")
    header, _ = header_of(folder / "model.safetensors")
    weight_map = {k: str(folder / "model.safetensors") for k in header if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    line = refused(folder, tmp_path / "moe", "is an absolute path", "'model.safetensors'")
    assert "outside" not in line


def test_config_that_is_null_says_null(tmp_path, llama):
    folder = copy(llama, tmp_path / "src")
    (folder / "config.json").write_text("null")
    line = refused(folder, tmp_path / "moe", "must be a JSON object, not null")
    assert "NoneType" not in line
    (folder / "config.json").write_text("[1]")
    refused(folder, tmp_path / "moe", "must be a JSON object, not an array")


def test_one_foreign_method_option_needs_its_method(tmp_path, llama):
    refused(llama, tmp_path / "moe", "--drop-ratio needs --method drop (got --method replicate)",
            args=["--drop-ratio", "0.3"])
