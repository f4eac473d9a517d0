"""Cohere2-MoE: the cohere2 decoder (parallel block, LayerNorm, ``layer_types`` copied) with a router
that softmaxes over the top-k logits, so the weights are renormalised. Its ``intermediate_size`` is the
expert width; layers kept dense are ``mlp_layer_types`` "dense" of ``prefix_dense_intermediate_size``."""

from .base import MLP_EXPERTS_LAYOUT, MoeTarget


def _moe_config(plan):
    dense = set(plan.dense_layers)
    return {
        "num_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        "prefix_dense_intermediate_size": plan.dense_size,
        "mlp_layer_types": ["dense" if i in dense else "sparse" for i in range(plan.num_layers)],
        # 1 would force RoPE onto dense full-attention layers, which cohere2 runs without RoPE
        "prefix_dense_sliding_window_pattern": 0,
        "num_shared_experts": 0,
        "expert_selection_fn": "softmax",
        "norm_topk_prob": True,
        "output_router_logits": False,
    }


TARGET = MoeTarget(
    name="cohere2_moe",
    config_class="Cohere2MoeConfig",
    families=("cohere2",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    supports_layer_subset=True,
    description="Cohere2MoeForCausalLM; layer_types (sliding/full) and logit_scale copied",
)
