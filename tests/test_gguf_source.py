"""The GGUF reader's own pieces: the file check and the one-table tensor-name map."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from click.testing import CliRunner  # noqa: E402

from upcycle.cli import cli  # noqa: E402
from upcycle.io.gguf import _gguf_to_hf_names  # noqa: E402

from factories import CONFIGS  # noqa: E402

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF "general.architecture"


@pytest.mark.parametrize("family", sorted(GGUF_ARCH))
def test_one_table_name_map_equals_transformers(family: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    config = CONFIGS[family]()
    config.tie_word_embeddings = False  # an untied lm_head must map to output.weight
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    arch = GGUF_ARCH[family]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    ours = _gguf_to_hf_names(skeleton, processor, arch, skeleton.state_dict())
    assert ours == get_gguf_hf_weights_map(skeleton, processor)
    assert "blk.0.ffn_gate.weight" in ours and "output.weight" in ours


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    result = CliRunner().invoke(cli, ["convert", str(bad), str(tmp_path / "out"), "-q"])
    assert result.exit_code != 0
    assert "not a GGUF file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
