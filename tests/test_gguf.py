"""A tiny llama written as GGUF (float32, llama.cpp's q/k permutation, a byte-level BPE tokenizer)
converts into a Mixtral that computes what transformers computes from the same GGUF file."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from checks import run_cli
from factories import EXACT_ATOL, VOCAB, read_json

gguf = pytest.importorskip("gguf")

GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _permute(x, n_head: int):
    """llama.cpp's rotary row order for q/k (transformers undoes it when reading)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_tiny_llama_gguf(folder: Path) -> Path:
    """A random 2-layer llama as ``folder/tiny.gguf`` (float32 tensors, gpt2-style tokenizer)."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    tokens = list(dict.fromkeys(string.ascii_letters + string.digits + string.punctuation))
    tokens = (tokens + ["ab"] + [f"<x{i}>" for i in range(VOCAB)])[:VOCAB]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, tensor in model.state_dict().items():
        array = tensor.numpy()
        if key in GLOBAL_NAMES:
            name = GLOBAL_NAMES[key]
        else:
            parts = key.split(".")
            module = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                array = _permute(array, 4 if module == "self_attn.q_proj" else 2)
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "src")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_gguf_source_is_exact(tmp_path, tiny_gguf, as_folder):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moe"
    source = tiny_gguf.parent if as_folder else tiny_gguf
    result = run_cli("convert", source, out, "-e", "4", "-k", "2", "-q", "--no-verify")
    assert result.exit_code == 0, result.output
    assert read_json(out / "config.json")["architectures"] == ["MixtralForCausalLM"]
    assert read_json(out / "config.json")["dtype"] == "float32"  # GGUF tensors are dequantised to float32
    dense = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    assert float((_logits(dense, ids) - _logits(moe, ids)).abs().max()) <= EXACT_ATOL
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert read_json(out / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer

    dense_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert AutoTokenizer.from_pretrained(out)("abc d!").input_ids == dense_tok("abc d!").input_ids


def test_gguf_verify_and_dry_run(tmp_path, tiny_gguf):
    out = tmp_path / "moe"
    dry = run_cli("convert", tiny_gguf, out, "-e", "2", "-k", "1", "--dry-run", "--json", "-q")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["target"] == "mixtral" and not out.exists()
    assert run_cli("convert", tiny_gguf, out, "-e", "2", "-k", "1", "-q", "--no-verify").exit_code == 0
    result = run_cli("verify", tiny_gguf, out, "--json", "-q", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exact_expected"] and report["passed"] and report["max_abs_logit_diff"] <= EXACT_ATOL


def test_corrupt_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 12)
    out = tmp_path / "moe"
    result = run_cli("convert", path, out, "-q")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("error:") and "broken.gguf" in result.output
    assert not out.exists()
