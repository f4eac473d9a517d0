"""The router losses of `upcycle train` (computed by the bundled model's own functions, which ship inside
checkpoints as remote code) match an independent reference, with and without padding, and padding tokens
count for nothing."""

import pytest
import torch

from upcycle.modeling import modeling_upcycle_moe as bundled
from upcycle.train import losses as trained

LAYERS, BATCH, SEQ, EXPERTS, TOP_K = 3, 2, 7, 6, 2


def _logits(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH * SEQ, EXPERTS, generator=gen) * 2 for _ in range(LAYERS)]


def _padding_mask():
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    return mask


def _reference(logits, real, router_type):
    """E * sum_e (share of the real tokens' top-k slots on e) * (their mean probability of e), layer mean."""
    losses = []
    for layer in logits:
        scores = layer[real].softmax(-1) if router_type == "softmax" else layer[real].sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
        counts = torch.bincount(probs.topk(TOP_K, -1).indices.reshape(-1), minlength=EXPERTS).float()
        losses.append(EXPERTS * (counts / counts.sum() * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("router_type", ["softmax", "sigmoid"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_bundled_losses_agree(router_type, padded, seed):
    logits, mask = _logits(seed), (_padding_mask() if padded else None)
    real = mask.reshape(-1).bool() if padded else torch.ones(BATCH * SEQ, dtype=torch.bool)
    expected = _reference(logits, real, router_type)
    z = torch.stack([torch.logsumexp(layer[real], -1).square().mean() for layer in logits]).mean()
    # [batch, seq, experts] (native MoE classes) and bf16 logits are flattened and computed in fp32 by train
    shaped = [layer.reshape(BATCH, SEQ, EXPERTS) for layer in logits]
    for ours in (trained.load_balancing_loss(logits, TOP_K, router_type, mask),
                 trained.load_balancing_loss(shaped, TOP_K, router_type, mask),
                 bundled.load_balancing_loss(logits, TOP_K, router_type, mask)):
        assert torch.allclose(ours, expected, rtol=1e-6, atol=0), (float(ours), float(expected))
    for ours in (trained.router_z_loss(logits, mask), trained.router_z_loss(shaped, mask),
                 bundled.router_z_loss(logits, mask)):
        assert torch.allclose(ours, z, rtol=1e-6, atol=0)
    low = trained.load_balancing_loss([layer.bfloat16() for layer in logits], TOP_K, router_type, mask)
    assert low.dtype == torch.float32 and torch.allclose(low, expected, rtol=2e-2)


@pytest.mark.parametrize("router_type", ["softmax", "sigmoid"])
def test_padding_counts_for_nothing(router_type):
    """A padded batch gives the loss of its real tokens alone, whatever the padded positions hold."""
    logits, mask = _logits(3), _padding_mask()
    real = mask.reshape(-1).bool()
    only_real = [layer[real] for layer in logits]
    noisy = [torch.where(real[:, None], layer, torch.full_like(layer, 50.0)) for layer in logits]
    for module in (trained, bundled):
        expected = module.load_balancing_loss(only_real, TOP_K, router_type)
        assert torch.allclose(module.load_balancing_loss(noisy, TOP_K, router_type, mask), expected, rtol=1e-6)
        assert torch.allclose(module.router_z_loss(noisy, mask), module.router_z_loss(only_real), rtol=1e-6)
        # without the mask the padded positions do count
        assert not torch.allclose(module.load_balancing_loss(noisy, TOP_K, router_type), expected, rtol=1e-3)


def test_balance_bounds():
    """1.0 when every expert gets the same share and probability; E when one expert takes everything."""
    # near-equal logits, the two favoured experts rolled along the rows: every expert gets 1/E of the slots
    rows = torch.arange(BATCH * SEQ * EXPERTS)
    uniform = [torch.stack([torch.roll(torch.tensor([1e-4, 1e-4] + [0.0] * (EXPERTS - 2)), int(r) % EXPERTS)
                            for r in rows])]
    assert trained.load_balancing_loss(uniform, TOP_K).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = [torch.tensor([[30.0, 29.0] + [0.0] * (EXPERTS - 2)]).repeat(BATCH * SEQ, 1)]
    # every token sends its 2 slots to experts 0 and 1, whose probabilities sum to ~1: E * 0.5 * (p0 + p1)
    assert trained.load_balancing_loss(collapsed, TOP_K).item() == pytest.approx(EXPERTS / 2, rel=1e-3)
