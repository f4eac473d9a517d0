"""Router losses computed from the per-layer router logits (``[tokens, experts]`` each).

One implementation: the bundled model's (``upcycle/modeling/modeling_upcycle_moe.py``, which ships inside
checkpoints as self-contained remote code and adds the same losses in its own forward). Here the logits
of any MoE (native transformers classes too) are flattened to ``[tokens, experts]`` and computed in fp32
first. Padding (``attention_mask == 0``) is left out of both losses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..modeling import modeling_upcycle_moe as _bundled


def _flat_fp32(router_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [logits.float().reshape(-1, logits.shape[-1]) for logits in router_logits]


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, router_type: str = "softmax",
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, averaged over layers; padding tokens are left out.

    Per layer ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k assignments to expert e and
    ``P_e`` its mean router probability: 1.0 at perfect balance, up to E when one expert takes every
    token. Gradient flows through ``P_e`` (the router); ``f_e`` is a count. For ``sigmoid`` routers ``P``
    is the per-token normalised sigmoid score.
    """
    return _bundled.load_balancing_loss(_flat_fp32(router_logits), top_k, router_type, attention_mask)


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of ``logsumexp(logits)^2``, averaged over layers.

    It keeps router logits small, which keeps routing stable in low precision.
    """
    return _bundled.router_z_loss(_flat_fp32(router_logits), attention_mask)
