"""Router losses computed from the per-layer router logits (``[tokens, experts]`` each).

The bundled model (``upcycle/modeling/modeling_upcycle_moe.py``) ships inside checkpoints as remote
code and so keeps its own copy of these two functions; tests/test_router_losses.py pins the two to the
same values, with and without padding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def token_mask(attention_mask: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """``[T, 1]`` float mask of the real tokens of flattened router logits ``[T, E]`` (padding is
    ``attention_mask == 0``); all ones without a ``[batch, seq]`` mask that matches the logits."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != logits.shape[0]:
        return logits.new_ones(logits.shape[0], 1)
    return attention_mask.reshape(-1, 1).to(device=logits.device, dtype=logits.dtype)


def routing_probs(logits: torch.Tensor, router_type: str = "softmax") -> torch.Tensor:
    """Per-token routing probabilities: softmax, or for ``sigmoid`` routers the sigmoid scores normalised
    to sum to one."""
    if router_type == "softmax":
        return logits.softmax(-1)
    probs = logits.sigmoid()
    return probs / probs.sum(-1, keepdim=True)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, router_type: str = "softmax",
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, averaged over layers; padding tokens are left out.

    Per layer ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k assignments to expert e and
    ``P_e`` its mean router probability: 1.0 at perfect balance, up to E when one expert takes every
    token. Gradient flows through ``P_e`` (the router); ``f_e`` is a count.
    """
    losses = []
    for logits in router_logits:
        logits = logits.float().reshape(-1, logits.shape[-1])
        num_experts = logits.shape[-1]
        probs = routing_probs(logits, router_type)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
        mask = token_mask(attention_mask, logits)
        denom = mask.sum().clamp_min(1.0)
        fraction = (chosen * mask).sum(0) / (denom * top_k)
        mean_prob = (probs * mask).sum(0) / denom
        losses.append(num_experts * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of ``logsumexp(logits)^2``, averaged over layers.

    It keeps router logits small, which keeps routing stable in low precision.
    """
    losses = []
    for logits in router_logits:
        logits = logits.float().reshape(-1, logits.shape[-1])
        mask = token_mask(attention_mask, logits)
        z = torch.logsumexp(logits, dim=-1, keepdim=True) ** 2
        losses.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(losses).mean()
