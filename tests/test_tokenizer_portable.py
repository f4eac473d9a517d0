"""Output tokenizers name a class both transformers generations know, and transformers 5 loads them unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from factories import read_json, save_tiny_tokenizer

from upcycle.io.tokenizer_files import make_tokenizer_config_portable

TEXT = "the cat of a dog is on the w7 and it was"


def _same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    assert a(TEXT).input_ids == b(TEXT).input_ids
    assert a.decode(a(TEXT).input_ids) == b.decode(b(TEXT).input_ids)
    assert (a.bos_token, a.eos_token, a.unk_token, a.pad_token) == (b.bos_token, b.eos_token, b.unk_token, b.pad_token)
    assert a.all_special_ids == b.all_special_ids and len(a) == len(b)


def test_transformers5_class_is_renamed_and_loads_unchanged(tmp_path):
    from transformers import AutoTokenizer

    source, out = tmp_path / "src", tmp_path / "out"
    save_tiny_tokenizer(source)
    assert read_json(source / "tokenizer_config.json")["tokenizer_class"] == "TokenizersBackend"
    shutil.copytree(source, out)

    assert make_tokenizer_config_portable(out) is True
    before, after = read_json(source / "tokenizer_config.json"), read_json(out / "tokenizer_config.json")
    assert after["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {k: v for k, v in after.items() if k != "tokenizer_class"} == \
        {k: v for k, v in before.items() if k != "tokenizer_class"}
    _same_tokenizer(AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source))
    assert make_tokenizer_config_portable(out) is False  # already portable


@pytest.mark.parametrize("case", ["named_class", "no_tokenizer_json"])
def test_other_configs_are_left_alone(tmp_path, case):
    save_tiny_tokenizer(tmp_path)
    config = read_json(tmp_path / "tokenizer_config.json")
    if case == "named_class":
        config["tokenizer_class"] = "GPT2Tokenizer"
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (tmp_path / "tokenizer.json").unlink()
    raw = (tmp_path / "tokenizer_config.json").read_bytes()
    assert make_tokenizer_config_portable(tmp_path) is False
    assert (tmp_path / "tokenizer_config.json").read_bytes() == raw


TRANSFORMERS4 = """
import json, sys
import transformers
from transformers import AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
print(json.dumps(AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2]).input_ids))
"""


@pytest.mark.skipif(not os.environ.get("UPCYCLE_TRANSFORMERS4_PYTHON"),
                    reason="set UPCYCLE_TRANSFORMERS4_PYTHON to a python with transformers 4.x installed")
def test_transformers4_loads_the_output_tokenizer(tmp_path):
    """The rewritten file loads in transformers 4 with the ids transformers 5 gives; the original does not."""
    from transformers import AutoTokenizer

    python = os.environ["UPCYCLE_TRANSFORMERS4_PYTHON"]
    save_tiny_tokenizer(tmp_path / "v5")
    shutil.copytree(tmp_path / "v5", tmp_path / "portable")
    make_tokenizer_config_portable(tmp_path / "portable")

    def run(folder):
        return subprocess.run([python, "-c", TRANSFORMERS4, str(folder), TEXT], capture_output=True, text=True)

    refused = run(tmp_path / "v5")
    assert refused.returncode != 0 and "TokenizersBackend does not exist" in refused.stderr
    loaded = run(tmp_path / "portable")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == AutoTokenizer.from_pretrained(tmp_path / "v5")(TEXT).input_ids
