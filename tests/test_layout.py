"""The output is what transformers itself would save: same keys, shapes and dtypes as a
``save_pretrained`` round trip, plus config, generation config, tokenizer, recipe and model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from checks import run_cli
from factories import EXACT_ATOL, make_dense, max_logit_diff, read_json, save_tiny_tokenizer
from safetensors import safe_open

from upcycle import Recipe

TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def _header(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, dtype) over all shards."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(folder / file, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _convert(dense: Path, out: Path, *args: str) -> Path:
    result = run_cli("convert", dense, out, "-e", "4", "-k", "2", "-q", *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_layout_matches_save_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = _convert(make_dense(family, tmp_path / "dense"), tmp_path / "moe")
    resaved = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(resaved)
    ours, theirs = _header(out), _header(resaved)
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    assert ours == theirs
    assert read_json(out / "config.json")["model_type"] == TARGETS[family]
    # transformers writes the same config back (nothing we wrote was dropped or defaulted differently)
    mine, back = read_json(out / "config.json"), read_json(resaved / "config.json")
    assert {k: v for k, v in mine.items() if k != "transformers_version"} == \
        {k: v for k, v in back.items() if k != "transformers_version"}


def test_sharded_output_matches_save_pretrained_index(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = make_dense("qwen2", tmp_path / "dense")
    out = _convert(dense, tmp_path / "moe", "--max-shard-size", "200KB")
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for shard in shards:  # each shard respects the limit (no single tensor here is larger)
        assert (out / shard).stat().st_size <= 200_000 + 4096
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    resaved = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(resaved, max_shard_size="200KB")
    theirs = read_json(resaved / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(theirs["weight_map"])
    assert index["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    for key, file in index["weight_map"].items():  # the index tells the truth
        with safe_open(out / file, "pt") as f:
            assert key in f.keys()
    assert max_logit_diff(dense, out) <= EXACT_ATOL


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                               ("float32", torch.float32)])
def test_dtype_is_respected(tmp_path, dtype, torch_dtype):
    from transformers import AutoModelForCausalLM

    out = _convert(make_dense("qwen3", tmp_path / "dense"), tmp_path / "moe", "--dtype", dtype)
    short = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    assert {d for _, d in _header(out).values()} == {short}
    assert read_json(out / "config.json")["dtype"] == dtype
    assert read_json(out / "upcycle_recipe.json")["upcycle"]["dtype"] == dtype
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch_dtype}


def test_dtype_auto_keeps_the_source_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = make_dense("llama", tmp_path / "dense")
    bf16 = tmp_path / "dense-bf16"
    AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).save_pretrained(bf16)
    out = _convert(bf16, tmp_path / "moe")
    assert {d for _, d in _header(out).values()} == {"BF16"}
    assert read_json(out / "config.json")["dtype"] == "bfloat16"


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen3", False)])
def test_tied_embeddings(tmp_path, family, tied):
    dense = make_dense(family, tmp_path / "dense")
    assert read_json(dense / "config.json").get("tie_word_embeddings", False) is tied
    out = _convert(dense, tmp_path / "moe")
    assert ("lm_head.weight" in _header(out)) is (not tied)
    assert read_json(out / "config.json")["tie_word_embeddings"] is tied


def test_tied_source_with_lm_head_on_disk(tmp_path):
    """Some tied checkpoints (old .bin files) still store lm_head.weight; it is not written."""
    from safetensors.torch import load_file

    dense = make_dense("llama", tmp_path / "dense")
    state = load_file(dense / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    torch.save(state, dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    out = _convert(dense, tmp_path / "moe")
    assert "lm_head.weight" not in _header(out)
    assert max_logit_diff(dense, out) <= EXACT_ATOL


def test_metadata_files(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    dense = make_dense("llama", tmp_path / "dense")
    save_tiny_tokenizer(dense)
    generation = GenerationConfig.from_pretrained(dense)
    generation.temperature, generation.top_p, generation.do_sample = 0.6, 0.9, True
    generation.save_pretrained(dense)
    out = _convert(dense, tmp_path / "moe", "--seed", "3")

    assert GenerationConfig.from_pretrained(out).to_dict() == GenerationConfig.from_pretrained(dense).to_dict()
    tokenizer_files = sorted(p.name for p in dense.glob("tokenizer*"))
    assert tokenizer_files
    for name in tokenizer_files:
        if name != "tokenizer_config.json":
            assert (out / name).read_bytes() == (dense / name).read_bytes()
    # the one change: a class name transformers 4 knows too (transformers 5 writes TokenizersBackend)
    config, dense_config = read_json(out / "tokenizer_config.json"), read_json(dense / "tokenizer_config.json")
    assert (dense_config.pop("tokenizer_class"), config.pop("tokenizer_class")) == ("TokenizersBackend",
                                                                                    "PreTrainedTokenizerFast")
    assert config == dense_config
    assert AutoTokenizer.from_pretrained(out)("the cat").input_ids == AutoTokenizer.from_pretrained(dense)("the cat").input_ids

    recipe = Recipe.load(out / "upcycle_recipe.json")
    assert recipe == Recipe(num_experts=4, top_k=2, seed=3)
    provenance = read_json(out / "upcycle_recipe.json")["upcycle"]
    assert provenance["source"] == dense.name and provenance["exact"] is True
    assert set(provenance["versions"]) >= {"upcycle", "torch", "transformers", "safetensors"}

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert {"moe", "upcycled"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "replicate" in card and "top-2" in card


def test_recipe_file_reproduces_the_conversion(tmp_path):
    """``upcycle convert SRC OUT --recipe OUT1/upcycle_recipe.json`` writes the same weights and recipe."""
    dense = make_dense("mistral", tmp_path / "dense")
    first = _convert(dense, tmp_path / "a", "--seed", "11", "--router-std", "0.5", "--dtype", "bfloat16")
    second = tmp_path / "b"
    result = run_cli("convert", dense, second, "--recipe", first / "upcycle_recipe.json", "-q")
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json", "upcycle_recipe.json", "README.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_json_summary_lists_files(tmp_path):
    dense = make_dense("llama", tmp_path / "dense")
    save_tiny_tokenizer(dense)
    result = run_cli("convert", dense, tmp_path / "moe", "-e", "4", "-q", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is False and summary["output"] == str(tmp_path / "moe")
    assert sorted(summary["files"]) == sorted(p.name for p in (tmp_path / "moe").iterdir())
