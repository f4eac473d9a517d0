"""The layer-streaming runner computes what the full model computes: logits equal the full-model forward
(max |Δ| <= 1e-5 at fp32) for every dense family and every MoE target of the support matrix, the bundled
model included, while holding one decoder layer at a time."""

import pytest
import torch
from click.testing import CliRunner
from factories import VOCAB, make_dense
from test_bundled_exact import CASES as BUNDLED_CASES
from test_exact_native import CASES as NATIVE_CASES
from test_families_native import CASES as FAMILY_NATIVE_CASES
from test_families_native import QWEN3_MIXED

from upcycle.cli import cli
from upcycle.runner import LayerCapError, MAX_LAYERS_ENV, forward_logits, open_streamed

TARGETS = ([(family, overrides, "auto") for family, _, overrides in NATIVE_CASES + FAMILY_NATIVE_CASES]
           + [("granite", {}, "granitemoeshared"), ("qwen3", QWEN3_MIXED, "dots1")]
           + [(family, overrides, "upcycle") for family, overrides in BUNDLED_CASES])


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (5, 19)] + [
        torch.randint(0, VOCAB, (2, 11), generator=gen)]


def _full_logits(path, batches):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(ids).logits for ids in batches]


def _assert_streamed_equals_full(path, max_layers=1):
    batches = _batches()
    streamed = open_streamed(str(path), max_layers=max_layers)
    got = forward_logits(streamed, batches)
    assert streamed.peak_resident == 1
    for want, have in zip(_full_logits(path, batches), got):
        assert have.shape == want.shape
        assert float((want - have).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", sorted({c[0] for c in BUNDLED_CASES}))
def test_dense_family_streams_exactly(tmp_path, family):
    _assert_streamed_equals_full(make_dense(family, tmp_path / "dense"))


@pytest.mark.parametrize("family,overrides,target", TARGETS,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(TARGETS)])
def test_moe_target_streams_exactly(tmp_path, family, overrides, target):
    dense = make_dense(family, tmp_path / "dense", **overrides)
    result = CliRunner().invoke(cli, ["convert", str(dense), str(tmp_path / "moe"), "-e", "4", "-k", "2", "-q",
                                      "--no-verify", "--target", target])
    assert result.exit_code == 0, result.output
    _assert_streamed_equals_full(tmp_path / "moe")


def test_layer_cap_refuses_a_second_resident_layer(tmp_path, monkeypatch):
    dense = make_dense("llama", tmp_path / "dense")
    monkeypatch.setenv(MAX_LAYERS_ENV, "1")
    streamed = open_streamed(str(dense))
    streamed.embed(_batches())
    with streamed.layer(0):
        with pytest.raises(LayerCapError, match="cap is 1"):
            with streamed.layer(1):
                pass
    with streamed.layer(1):  # the first one was freed
        assert all(p.device.type == "meta" for p in streamed.layers[0].parameters())


def test_freed_layer_holds_no_memory(tmp_path):
    dense = make_dense("qwen2", tmp_path / "dense")
    streamed = open_streamed(str(dense))
    streamed.embed(_batches())
    with streamed.layer(2) as layer:
        assert all(p.device.type == "cpu" for p in layer.parameters())
    assert all(p.device.type == "meta" for p in streamed.model.parameters() if p is not None
               and not any(p is q for q in _outside(streamed)))


def _outside(streamed):
    layers = {id(p) for p in streamed.layers.parameters()}
    return [p for p in streamed.model.parameters() if id(p) not in layers]


def test_gguf_source_streams_exactly(tmp_path):
    """A .gguf dense source (dequantised tensor by tensor) streams to transformers' own GGUF loading."""
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_llama_gguf
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path / "src")
    batches = [ids % 32 for ids in _batches()]
    got = forward_logits(open_streamed(str(path), max_layers=1), batches)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for ids, have in zip(batches, got):
            assert float((model(ids).logits - have).abs().max()) <= 1e-5


def test_pytorch_bin_source_streams_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file

    dense = make_dense("gpt2", tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(dense / "config.json", tmp_path / "bin")
    torch.save(load_file(dense / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    _assert_streamed_equals_full(tmp_path / "bin")


@pytest.mark.parametrize("family,target,stored,compute", [
    ("llama", "mixtral", "bfloat16", "float32"),   # bf16 checkpoint run at fp32: experts fused in bf16, then cast
    ("ernie4_5", "auto", "bfloat16", "bfloat16"),  # its router weight stays fp32 (_keep_in_fp32_modules_strict)
    ("hunyuan_v1_dense", "auto", "float32", "bfloat16"),  # its router is created in fp32 and stays so
])
def test_storage_and_compute_dtypes_match_from_pretrained(tmp_path, family, target, stored, compute):
    from transformers import AutoModelForCausalLM

    dense = make_dense(family, tmp_path / "dense")
    result = CliRunner().invoke(cli, ["convert", str(dense), str(tmp_path / "moe"), "-e", "4", "-k", "2", "-q",
                                      "--no-verify", "--target", target, "--dtype", stored])
    assert result.exit_code == 0, result.output
    batches = _batches()
    streamed = open_streamed(str(tmp_path / "moe"), dtype=compute, max_layers=1)
    got = forward_logits(streamed, batches)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=getattr(torch, compute)).eval()
    assert {p.dtype for p in streamed.model.parameters() if p.device.type == "meta"} >= {getattr(torch, compute)}
    with torch.no_grad():
        for ids, have in zip(batches, got):
            assert float((full(ids).logits.float() - have).abs().max()) <= 1e-5
    routers = {n: p.dtype for n, p in full.named_parameters() if n.endswith(("mlp.gate.weight", "gate.wg.weight"))}
    staged = {n: p.dtype for n, p in streamed.model.named_parameters() if n in routers}
    assert staged == routers  # the skeleton keeps the dtypes from_pretrained gives
