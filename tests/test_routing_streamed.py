"""``inspect --routing`` through the layer-streaming runner counts the expert assignments the whole model
makes (the implementation it replaced, kept here as the reference), for a native target and the bundled
model, holding one layer at a time."""

from __future__ import annotations

import pytest
import torch
from factories import make_dense, save_tiny_tokenizer

from upcycle.convert import convert
from upcycle.train.routing_heatmap import measure_routing

WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()


def _reference_counts(model_path, data, seq_len, top_k, num_experts):
    """Whole-model forwards with ``output_router_logits=True`` (upcycle 0.x's measurement)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from upcycle.train.data import PackedDataset, tokenise
    from upcycle.train.monitor import assignment_counts
    from upcycle.tokenizer import load_tokenizer
    from upcycle.train.run import eos_id
    from upcycle.train.trainer import router_logits_of

    config = AutoConfig.from_pretrained(model_path)
    tokenizer = load_tokenizer(model_path)
    dataset = PackedDataset(tokenise(data, tokenizer, eos_id(tokenizer, config)), seq_len, str(data))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    counts = None
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            out = model(input_ids=dataset.blocks[start:start + 4], output_router_logits=True, use_cache=False)
            batch = assignment_counts(router_logits_of(out), top_k)
            counts = batch if counts is None else counts + batch
    return counts


@pytest.mark.parametrize("family,target", [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("gpt2", "upcycle")])
def test_streamed_routing_counts_equal_the_whole_model(tmp_path, family, target, monkeypatch):
    dense = make_dense(family, tmp_path / "dense")
    save_tiny_tokenizer(dense)
    moe = tmp_path / "moe"
    convert(dense, moe, quiet=True, num_experts=4, top_k=2, router_std=0.5, target=target, verify=False)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(WORDS[(i * j) % len(WORDS)] for j in range(12)) for i in range(40)))
    monkeypatch.setenv("UPCYCLE_MAX_RESIDENT_LAYERS", "1")
    stats = measure_routing(moe, data, seq_len=32)
    want = _reference_counts(moe, data, 32, 2, 4)
    shares = want / want.sum(1, keepdim=True)
    assert stats["layers"] == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(stats["share"], dtype=torch.float64), shares)
    assert stats["cv_mean"] > 0  # an uneven router: the comparison is not between two uniform loads


def test_inspect_routing_takes_device_and_dtype(tmp_path):
    import json

    from click.testing import CliRunner

    from upcycle.cli import cli

    dense = make_dense("llama", tmp_path / "dense")
    save_tiny_tokenizer(dense)
    convert(dense, tmp_path / "moe", quiet=True, num_experts=4, top_k=2, router_std=0.5, verify=False)
    (tmp_path / "d.txt").write_text(" ".join(WORDS * 10))
    args = ["inspect", str(tmp_path / "moe"), "--routing", str(tmp_path / "d.txt"), "--heatmap",
            str(tmp_path / "h.png"), "--seq-len", "32", "--json"]
    fp32 = CliRunner().invoke(cli, args + ["--device", "auto"])
    bf16 = CliRunner().invoke(cli, args + ["--dtype", "bfloat16"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    assert json.loads(fp32.output)["routing"]["tokens"] == json.loads(bf16.output)["routing"]["tokens"] > 0
    bad = CliRunner().invoke(cli, args + ["--device", "warp"])
    assert bad.exit_code == 2 and "--device 'warp'" in bad.output
