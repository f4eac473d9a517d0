"""Router losses computed from the per-layer router logits (``[tokens, experts]`` each)."""

from __future__ import annotations

from typing import Sequence

import torch


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, router_type: str = "softmax") -> torch.Tensor:
    """Switch-Transformer load-balancing loss, averaged over layers.

    Per layer ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k assignments to expert e and
    ``P_e`` its mean router probability: 1.0 at perfect balance, up to E when one expert takes every
    token. Gradient flows through ``P_e`` (the router); ``f_e`` is a count. For ``sigmoid`` routers ``P``
    is the per-token normalised sigmoid score.
    """
    losses = []
    for logits in router_logits:
        logits = logits.float().reshape(-1, logits.shape[-1])
        num_experts = logits.shape[-1]
        if router_type == "sigmoid":
            probs = logits.sigmoid()
            probs = probs / probs.sum(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(logits, top_k, dim=-1).indices
        counts = torch.zeros(num_experts, device=logits.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device))
        fraction = counts / chosen.numel()
        losses.append(num_experts * torch.sum(fraction * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``, averaged over layers.

    It keeps router logits small, which keeps routing stable in low precision.
    """
    losses = [torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1).square().mean()
              for logits in router_logits]
    return torch.stack(losses).mean()
