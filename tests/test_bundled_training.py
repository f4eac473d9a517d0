"""The bundled model trains: router logits, load-balancing and z-loss in the loss with gradients,
gradient checkpointing, and a Trainer step."""

import pytest
import torch
from factories import VOCAB, make_dense

from upcycle.convert import convert


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dense = make_dense("llama", root / "dense", mlp_bias=True)
    convert(dense, root / "moe", target="upcycle", num_experts=4, top_k=2, router_std=0.5, quiet=True, verify=False)
    return root / "moe"


def _load(path, **kw):
    from upcycle.modeling import UpcycleMoeForCausalLM

    return UpcycleMoeForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def _batch():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _router_grads(model):
    return [b.router.weight.grad.clone() for b in model.moe_blocks]


def _switch_loss(router_logits, real, top_k):
    """E * sum_e (share of real tokens' top-k slots on e) * (mean probability of e), averaged over layers."""
    losses = []
    for logits in router_logits:
        probs = logits[real].softmax(-1)
        counts = torch.bincount(probs.topk(top_k, -1).indices.reshape(-1), minlength=probs.shape[-1]).float()
        losses.append(probs.shape[-1] * (counts / counts.sum() * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def test_aux_and_z_loss_are_in_the_loss_with_gradients(moe_path):
    model = _load(moe_path).train()
    ids, mask = _batch()
    plain = model(ids, attention_mask=mask, labels=ids, output_router_logits=False)
    assert plain.aux_loss is None and plain.router_logits is None
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == model.config.text_config.num_hidden_layers
    assert out.router_logits[0].shape == (ids.numel(), 4) and out.router_logits[0].dtype == torch.float32
    z = torch.stack([torch.logsumexp(l, -1).pow(2)[mask.reshape(-1).bool()].mean() for l in out.router_logits]).mean()
    cfg = model.config
    assert torch.isfinite(out.aux_loss)
    assert torch.allclose(out.aux_loss, _switch_loss(out.router_logits, mask.reshape(-1).bool(), 2), atol=1e-6)
    expected = plain.loss + cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * z
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    grads = _router_grads(model)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(moe_path):
    ids, mask = _batch()
    grads = []
    for checkpointing in (False, True):
        model = _load(moe_path, output_router_logits=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(_router_grads(model) + [model.get_input_embeddings().weight.grad.clone()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_trainer_step(moe_path, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _load(moe_path, output_router_logits=True)
    before = model.moe_blocks[0].experts[0].up_proj.weight.detach().clone()
    rows = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             gradient_checkpointing=True, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.moe_blocks[0].experts[0].up_proj.weight.detach())
