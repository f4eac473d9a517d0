"""Property-based fuzzing (hypothesis) of the inputs a user or a hostile repo controls: safetensors
headers, shard indexes, config.json and recipe files.

Every generated input is malformed by construction; each must end with exit code 2, exactly one
``error:`` line, no traceback, nothing written (no output, no temporary folder, no lock) and the source
unchanged. Example counts are fixed and derandomised so the suite's run time stays bounded in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from checks import leftovers, run_cli, tree_hashes
from factories import make_dense
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: examples per test: fixed and derandomised in CI; UPCYCLE_FUZZ_EXAMPLES=500 searches longer (and randomly)
EXAMPLES = int(os.environ.get("UPCYCLE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="UPCYCLE_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def dense(root) -> Path:
    return make_dense("llama", root / "dense")


@pytest.fixture(scope="module")
def sharded(root, dense) -> Path:
    """The same model in two shards with an index."""
    from safetensors.torch import load_file, save_file

    folder = root / "sharded"
    folder.mkdir()
    shutil.copyfile(dense / "config.json", folder / "config.json")
    state = load_file(dense / "model.safetensors")
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _workdir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root, prefix="case-"))


def assert_refused(*args, source: Path, work: Path, inspect: bool = False) -> None:
    """``upcycle convert SOURCE OUT`` exits 2 with one error line, writes nothing, leaves the source as it was."""
    before = tree_hashes(source)
    out = work / "moe"
    result = run_cli("convert", source, out, "-q", "--no-verify", *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1, result.output
    assert not out.exists() and leftovers(work) == []
    assert tree_hashes(source) == before
    if inspect:
        result = run_cli("inspect", source)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output


# --- values that are never what a field needs -----------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3)), max_leaves=8)
not_an_index = st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=8), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=2))


# --- safetensors headers ---------------------------------------------------------------------------

def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def broken_files(draw, valid: tuple[dict, bytes]) -> bytes:
    """A model.safetensors whose header or layout breaks the format in one way."""
    header, data = json.loads(json.dumps(valid[0])), valid[1]
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "shift", "shift", "trailing", "drop_field",
                                 "not_object", "not_json", "truncate", "length_prefix", "entry_not_object",
                                 "metadata"]))
    body = None
    if kind == "dtype":  # no valid dtype name: another one of the same width would be a valid file
        from upcycle.io.safetensors_format import STR_TO_DTYPE

        entry["dtype"] = draw(json_values.filter(lambda v: not (isinstance(v, str) and v in STR_TO_DTYPE)))
    elif kind == "shape":
        numel = 1
        for d in entry["shape"]:
            numel *= d
        entry["shape"] = draw(st.one_of(
            json_values.filter(lambda v: not isinstance(v, list)),
            st.lists(not_an_index, min_size=1, max_size=3),
            st.lists(st.integers(0, 2**40), max_size=3).filter(lambda s: _product(s) != numel)))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.one_of(
            json_values.filter(lambda v: not isinstance(v, list)),
            st.lists(st.integers(-2**40, 2**40), max_size=3).filter(lambda o: o != entry["data_offsets"]),
            st.lists(not_an_index, min_size=2, max_size=2)))
    elif kind == "shift":  # same length, moved: overlaps a neighbour, leaves a gap or runs past the end
        start, end = entry["data_offsets"]
        delta = draw(st.integers(-start, len(data)).filter(lambda d: d != 0))
        entry["data_offsets"] = [start + delta, end + delta]
    elif kind == "trailing":
        data = data + draw(st.binary(min_size=1, max_size=64))
    elif kind == "drop_field":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "entry_not_object":
        header[name] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif kind == "metadata":
        header["__metadata__"] = draw(st.one_of(
            json_values.filter(lambda v: not isinstance(v, dict) and v is not None),  # null: no metadata, valid
            st.dictionaries(st.text(max_size=4), json_values.filter(lambda v: not isinstance(v, str)),
                            min_size=1, max_size=2)))
    elif kind == "not_object":
        body = json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "not_json":
        body = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b)))
    if kind == "truncate":
        full = _encode(header, data)
        return full[:draw(st.integers(0, len(full) - 1))]
    if kind == "length_prefix":
        full = _encode(header, data)
        (n,) = struct.unpack("<Q", full[:8])
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1).filter(lambda m: m != n))) + full[8:]
    return _encode(header if body is None else body, data)


def _product(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (ValueError, RecursionError):
        return False


def _encode(header, data: bytes) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


@FUZZ
@given(st.data())
def test_fuzzed_safetensors_header_is_refused(root, dense, data):
    valid = _header(dense / "model.safetensors")
    work = _workdir(root)
    source = work / "src"
    shutil.copytree(dense, source)
    (source / "model.safetensors").write_bytes(data.draw(broken_files(valid)))
    assert_refused(source=source, work=work, inspect=True)
    shutil.rmtree(work)


# --- indexes ---------------------------------------------------------------------------------------

@st.composite
def broken_indexes(draw, weight_map: dict[str, str]) -> bytes:
    """An index that is not an object, has no usable weight_map, names files outside the folder, names a
    missing shard, or disagrees with what the shards hold."""
    shards = sorted(set(weight_map.values()))
    kind = draw(st.sampled_from(["not_object", "map_not_object", "value_not_string", "outside", "missing_shard",
                                 "wrong_shard", "dropped_tensor", "not_json"]))
    wm = dict(weight_map)
    name = draw(st.sampled_from(sorted(wm)))
    if kind == "not_object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "not_json":
        return draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b)))
    if kind == "map_not_object":
        return json.dumps({"weight_map": draw(json_values.filter(lambda v: not isinstance(v, dict)))}).encode()
    if kind == "value_not_string":
        wm[name] = draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif kind == "outside":
        prefix = draw(st.sampled_from(["/", "../", "../../", "sub/../../", "./../"]))
        wm[name] = prefix + draw(st.sampled_from(["etc/passwd", "private/model.safetensors", shards[0]]))
    elif kind == "missing_shard":
        wm[name] = draw(st.from_regex(r"[a-z0-9_-]{1,12}\.safetensors", fullmatch=True).filter(
            lambda f: f not in shards))
    elif kind == "wrong_shard":
        wm[name] = next(s for s in shards if s != wm[name])
    elif kind == "dropped_tensor":
        del wm[name]
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}).encode()


@FUZZ
@given(st.data())
def test_fuzzed_index_is_refused(root, sharded, data):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    work = _workdir(root)
    source = work / "src"
    shutil.copytree(sharded, source)
    (source / "model.safetensors.index.json").write_bytes(data.draw(broken_indexes(weight_map)))
    assert_refused(source=source, work=work, inspect=True)
    shutil.rmtree(work)


# --- config.json -----------------------------------------------------------------------------------

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings")


@st.composite
def broken_configs(draw, config: dict) -> bytes:
    """A config.json that is not JSON, not an object, lacks or garbles model_type, or holds a size that is
    not a positive integer (or a layer count beyond the layers the weights hold)."""
    cfg = dict(config)
    kind = draw(st.sampled_from(["not_json", "not_object", "no_model_type", "model_type", "size", "layers"]))
    if kind == "not_json":
        return draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b)))
    if kind == "not_object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "no_model_type":
        del cfg["model_type"]
    elif kind == "model_type":
        from transformers import CONFIG_MAPPING

        cfg["model_type"] = draw(st.one_of(json_values.filter(lambda v: not isinstance(v, str)),
                                           st.text(max_size=12).filter(lambda t: t not in CONFIG_MAPPING)))
    elif kind == "size":
        key = draw(st.sampled_from(SIZE_KEYS))
        cfg[key] = draw(st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=6),
                                  st.lists(st.integers(1, 8), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                            st.integers(), max_size=1)))
    elif kind == "layers":
        cfg["num_hidden_layers"] = draw(st.integers(config["num_hidden_layers"] + 1, 10**12))
    return json.dumps(cfg, allow_nan=True).encode()


@FUZZ
@given(st.data())
def test_fuzzed_config_is_refused(root, dense, data):
    config = json.loads((dense / "config.json").read_text())
    work = _workdir(root)
    source = work / "src"
    shutil.copytree(dense, source)
    (source / "config.json").write_bytes(data.draw(broken_configs(config)))
    assert_refused(source=source, work=work)
    shutil.rmtree(work)


# --- recipe files ----------------------------------------------------------------------------------

def _not(*kinds):
    """JSON values of any type but ``kinds`` (bool counts as its own type)."""
    return json_values.filter(lambda v: not (isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)))


WRONG_VALUES = {
    "num_experts": _not(int), "top_k": _not(int), "seed": _not(int), "calibration_tokens": _not(int),
    "granularity": _not(int), "shared_experts": _not(int),
    "router_std": st.one_of(_not(int, float), st.sampled_from([float("nan"), float("inf"), -1.0])),
    "noise_std": st.one_of(_not(int, float), st.sampled_from([float("nan"), float("-inf"), -0.5])),
    "drop_ratio": st.one_of(_not(int, float), st.sampled_from([float("nan"), 1.5, -0.1])),
    "method": _not(str), "target": _not(str), "router_init": _not(str), "dtype": _not(str),
    "split_strategy": _not(str), "revision": _not(str, type(None)), "calibration": _not(str, type(None)),
    "allow_inexact": _not(bool), "layers": _not(str, int, list), "max_shard_size": _not(str, int),
}


@st.composite
def broken_recipes(draw) -> tuple[str, str]:
    """(suffix, text) of a recipe file with one bad value, an unknown key, an alias, a non-mapping top level,
    deep nesting or bytes that are not text."""
    kind = draw(st.sampled_from(["value", "value", "unknown_key", "alias", "not_mapping", "deep"]))
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    if kind == "value":
        key = draw(st.sampled_from(sorted(WRONG_VALUES)))
        extra = {"method": "split"} if key in ("granularity", "shared_experts", "split_strategy") else \
            {"method": "drop"} if key == "drop_ratio" else {}
        data = {**extra, key: draw(WRONG_VALUES[key])}
    elif kind == "unknown_key":
        from upcycle.recipe import Recipe

        data = {draw(st.text(min_size=1, max_size=10).filter(
            lambda k: k.replace("-", "_") not in Recipe.keys() and k != "upcycle")): draw(json_scalars)}
    elif kind == "alias":
        key = draw(st.sampled_from(["layers", "num_experts", "calibration", "seed"]))
        return ".yaml", f"x: &a [1, 2, 3]\n{key}: *a\n"
    elif kind == "not_mapping":
        data = draw(json_values.filter(lambda v: not isinstance(v, dict) and v is not None))
    else:
        depth = draw(st.integers(3000, 30000))
        return suffix, '{"layers": ' + "[" * depth + "]" * depth + "}"
    if suffix == ".json":
        return suffix, json.dumps(data)
    return suffix, yaml.safe_dump(data)


@FUZZ
@given(broken_recipes())
def test_fuzzed_recipe_is_refused(root, dense, recipe):
    suffix, text = recipe
    work = _workdir(root)
    path = work / f"recipe{suffix}"
    path.write_text(text)
    assert_refused("--recipe", path, source=dense, work=work)
    shutil.rmtree(work)


@FUZZ
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" in b or not _utf8(b)))
def test_fuzzed_binary_recipe_is_refused(root, dense, raw):
    work = _workdir(root)
    path = work / "recipe.yaml"
    path.write_bytes(raw)
    assert_refused("--recipe", path, source=dense, work=work)
    shutil.rmtree(work)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
