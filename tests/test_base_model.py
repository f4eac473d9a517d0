"""The card's ``base_model`` for local sources: ``--base-model``, a Hugging Face cache snapshot folder, or the
``_name_or_path`` repo id in the config; a malformed ``--base-model`` is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from checks import assert_clean_error, run_cli
from factories import make_dense, read_json


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_dense("llama", tmp_path_factory.mktemp("base") / "dense")


def _card_base_model(out: Path):
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    return meta.get("base_model"), meta.get("base_model_relation")


def _convert(source: Path, out: Path, *extra: str) -> Path:
    result = run_cli("convert", source, out, "-e", "2", "-k", "1", "-q", "--no-verify", *extra)
    assert result.exit_code == 0, result.output
    return out


def _with_name_or_path(dense: Path, folder: Path, name: str) -> Path:
    shutil.copytree(dense, folder)
    config = read_json(folder / "config.json")
    config["_name_or_path"] = name  # what transformers 4's save_pretrained wrote
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cache_snapshot_folder_names_its_repo(tmp_path, dense):
    snapshot = tmp_path / "hub" / "models--SomeOrg--Tiny-Llama" / "snapshots" / ("c" * 40)
    shutil.copytree(dense, snapshot)
    out = _convert(snapshot, tmp_path / "moe")
    assert _card_base_model(out) == ("SomeOrg/Tiny-Llama", "finetune")
    assert read_json(out / "upcycle_recipe.json")["upcycle"]["base_model"] == "SomeOrg/Tiny-Llama"


@pytest.mark.parametrize(("name", "expected"), [("SomeOrg/tiny-base", "SomeOrg/tiny-base"),
                                                ("/home/me/models/tiny", None), ("runs/../ckpt", None)])
def test_config_name_or_path_when_it_is_a_repo_id(tmp_path, dense, name, expected):
    out = _convert(_with_name_or_path(dense, tmp_path / "src", name), tmp_path / "moe")
    assert _card_base_model(out)[0] == expected


def test_base_model_option_wins(tmp_path, dense):
    source = _with_name_or_path(dense, tmp_path / "src", "SomeOrg/tiny-base")
    out = _convert(source, tmp_path / "moe", "--base-model", "Other/named-base")
    assert _card_base_model(out) == ("Other/named-base", "finetune")
    assert "[Other/named-base](https://huggingface.co/Other/named-base)" in (out / "README.md").read_text()


def test_api_takes_base_model(tmp_path, dense):
    from upcycle.convert import convert

    convert(dense, tmp_path / "moe", num_experts=2, top_k=1, quiet=True, verify=False, base_model="Org/base")
    assert _card_base_model(tmp_path / "moe")[0] == "Org/base"


@pytest.mark.parametrize("bad", ["a/b/c", "org/has space", "org--x/y"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_base_model_is_one_error_line(tmp_path, dense, bad, dry_run):
    out = tmp_path / "moe"
    result = run_cli("convert", dense, out, "-e", "2", "-q", "--base-model", bad, *(["--dry-run"] if dry_run else []))
    assert_clean_error(result, out, "--base-model", repr(bad), "namespace/name")
