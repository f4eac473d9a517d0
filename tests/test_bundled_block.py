"""The MoE block's grouped dispatch computes what a per-token loop over the chosen experts computes."""

import pytest
import torch

from upcycle.modeling.configuration_upcycle_moe import UpcycleMoeConfig
from upcycle.modeling.modeling_upcycle_moe import UpcycleMoeBlock


def _block(**kw):
    from transformers import LlamaConfig

    text = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    block = UpcycleMoeBlock(UpcycleMoeConfig(text_config=text, num_experts=5, num_experts_per_tok=2,
                                             moe_intermediate_size=12, **kw)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


def _reference(block, x):
    """Token by token: route, pick top-k, weight each chosen expert's output."""
    out = []
    for token in x:
        logits = block.router.weight.float() @ token.float()
        scores = logits.softmax(-1) if block.router_type == "softmax" else logits.sigmoid()
        w, ids = scores.topk(block.top_k)
        if block.norm_topk_prob:
            w = w / w.sum()
        y = sum(wi * block.routed_scaling_factor * block.experts[int(i)](token) for wi, i in zip(w, ids))
        if block.shared_experts is not None:
            s = block.shared_experts(token)
            y = y + (torch.sigmoid(block.shared_expert_gate(token)) * s if block.shared_expert_gate is not None else s)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("kw", [
    {},
    {"router_type": "sigmoid", "routed_scaling_factor": 2.5},
    {"norm_topk_prob": False, "mlp_gated": False, "mlp_bias": True, "hidden_act": "gelu_new"},
    {"shared_expert_intermediate_size": 8, "shared_expert_gated": True, "mlp_bias": True},
    {"shared_expert_intermediate_size": 8, "router_type": "sigmoid"},
])
def test_dispatch_matches_per_token_reference(kw):
    block = _block(**kw)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = block(x)
        want = _reference(block, x.reshape(-1, 16)).reshape(x.shape)
    assert torch.allclose(got, want, atol=1e-5)


def test_identical_experts_with_renormalised_weights_equal_one_expert():
    """Why replicate is exact: renormalised top-k weights sum to 1 (softmax and sigmoid routers)."""
    for router_type in ("softmax", "sigmoid"):
        block = _block(router_type=router_type)
        with torch.no_grad():
            for expert in block.experts[1:]:
                expert.load_state_dict(block.experts[0].state_dict())
            x = torch.randn(10, 16)
            assert torch.allclose(block(x), block.experts[0](x), atol=1e-5)
