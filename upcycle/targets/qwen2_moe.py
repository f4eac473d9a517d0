"""Qwen2-MoE: renormalised top-k (norm_topk_prob=true), per-layer sliding windows, sigmoid-gated shared expert.

Replicated experts carry the whole FFN, so the shared expert is written with width 0 (it adds nothing);
with ``--shared-experts`` it holds the shared neurons, its gate weights zero and its down projection doubled.
"""

import dataclasses

from ..tensors import zeros_tensor
from .base import MLP_EXPERTS_LAYOUT, MoeTarget, slice_tensor


def _moe_config(plan):
    return {
        "num_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "moe_intermediate_size": plan.expert_size,
        "intermediate_size": plan.dense_size,
        "shared_expert_intermediate_size": plan.shared_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": plan.dense_layers,
        "output_router_logits": False,
    }


def _shared_expert(plan, layer):
    """The shared expert (width 0 unless ``--shared-experts``) and its sigmoid gate with zero weights.

    sigmoid(0) = 1/2, so the shared expert's down projection is doubled: exact.
    """
    hidden, width = plan.hidden_size, plan.shared_size
    prefix = f"model.layers.{layer}.mlp."
    gate = zeros_tensor(prefix + "shared_expert_gate.weight", (1, hidden), plan.dtype)
    shared = plan.layers[layer].shared
    if shared is None:
        return [
            zeros_tensor(prefix + "shared_expert.gate_proj.weight", (width, hidden), plan.dtype),
            zeros_tensor(prefix + "shared_expert.up_proj.weight", (width, hidden), plan.dtype),
            zeros_tensor(prefix + "shared_expert.down_proj.weight", (hidden, width), plan.dtype),
            gate,
        ]
    sl = dataclasses.replace(shared, down_scale=shared.down_scale * TARGET.shared_expert_scale)
    return [slice_tensor(plan, f"{prefix}shared_expert.{proj}_proj.weight", layer, proj, sl)
            for proj in ("gate", "up", "down")] + [gate]


TARGET = MoeTarget(
    name="qwen2_moe",
    config_class="Qwen2MoeConfig",
    families=("qwen2",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    supports_layer_subset=True,
    extra_layer_tensors=_shared_expert,
    shared_expert_scale=2.0,
    description="Qwen2MoeForCausalLM with norm_topk_prob=true; layer_types copied",
)
