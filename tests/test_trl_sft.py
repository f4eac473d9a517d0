"""examples/trl_sft.py: TRL's SFTTrainer fine-tunes an upcycled Mixtral and the bundled model with the router aux loss
in the loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from factories import make_dense, save_tiny_tokenizer

from upcycle.convert import convert

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()


def _example():
    spec = importlib.util.spec_from_file_location("trl_sft_example", ROOT / "examples" / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl")
    dense = make_dense("llama", folder / "dense")
    save_tiny_tokenizer(dense)
    convert(dense, folder / "moe", num_experts=4, top_k=2, router_std=0.5, quiet=True, verify=False)
    convert(dense, folder / "bundled", target="upcycle", num_experts=4, top_k=2, quiet=True, verify=False)
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + (5 * i) % 20)) for i in range(120)]
    (folder / "data.txt").write_text("\n".join(lines))
    return folder


def test_sft_trains_with_the_aux_loss(work):
    from transformers import AutoModelForCausalLM

    out = work / "sft"
    summary = _example().main([str(work / "moe"), str(work / "data.txt"), str(out), "--max-steps", "6",
                               "--batch-size", "4", "--max-length", "32", "--learning-rate", "3e-3",
                               "--aux-loss-coef", "0.02"])
    assert summary["steps"] == 6 and summary["aux_loss_enabled"] and summary["router_aux_loss_coef"] == 0.02
    assert all(a is not None and a > 0 for a in summary["aux_losses"])
    assert summary["losses"][-1] < summary["losses"][0]
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == "MixtralForCausalLM" and trained.config.output_router_logits is False
    assert trained.config.router_aux_loss_coef == 0.02


def test_sft_trains_the_bundled_model_with_the_aux_loss(work):
    """--target upcycle: SFTTrainer finds the MoE settings through get_text_config() and the router logits through
    base_model; the output reloads as the bundled model with the coefficient it trained with."""
    import json

    from transformers import AutoModelForCausalLM

    out = work / "sft-bundled"
    summary = _example().main([str(work / "bundled"), str(work / "data.txt"), str(out), "--max-steps", "6",
                               "--batch-size", "4", "--max-length", "32", "--learning-rate", "3e-3",
                               "--aux-loss-coef", "0.02"])
    assert summary["steps"] == 6 and summary["aux_loss_enabled"] and summary["router_aux_loss_coef"] == 0.02
    # TRL's aux loss is Mixtral's formula, which counts each of the top-k choices: about k = 2 when balanced
    assert all(a is not None and 1.0 < a < 4.0 for a in summary["aux_losses"])
    assert summary["losses"][-1] < summary["losses"][0]
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == "UpcycleMoeForCausalLM" and trained.config.output_router_logits is False
    assert trained.config.router_aux_loss_coef == trained.config.get_text_config().router_aux_loss_coef == 0.02
    assert (out / "modeling_upcycle_moe.py").is_file() and (out / "configuration_upcycle_moe.py").is_file()
    assert "router_aux_loss_coef" not in json.loads((out / "config.json").read_text())["text_config"]
    before = AutoModelForCausalLM.from_pretrained(work / "bundled")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert any(".router." in n for n in changed) and any(".experts." in n for n in changed)


def test_fused_lm_head_on_the_bundled_model(work):
    """TRL's fused LM head over model.base_model: the model's own language-model loss, and an aux loss (Mixtral's
    formula over the bundled router logits) that reaches the routers' gradients."""
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(work / "bundled", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 3, 60, 22, 9, 41], [1, 2, 88, 13, 13, 70, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        lm_only = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    add_fused_lm_head(model)
    fused = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True, output_router_logits=True)
    expected_aux = load_balancing_loss_func(plain.router_logits, 4, 2, mask)
    assert torch.allclose(fused.aux_loss, expected_aux) and fused.aux_loss.requires_grad
    coef = model.config.get_text_config().router_aux_loss_coef
    assert torch.allclose(fused.loss, lm_only + coef * fused.aux_loss, atol=1e-5)
    fused.aux_loss.backward()
    assert all(block.router.weight.grad.abs().sum() > 0 for block in model.moe_blocks)
