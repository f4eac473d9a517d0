"""Qwen2-MoE: renormalised top-k (norm_topk_prob=true), per-layer sliding windows, sigmoid-gated shared expert.

Replicated experts carry the whole FFN, so the shared expert is written with width 0 (it adds nothing).
"""

from .base import MoeTarget


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
    """Shared expert of width ``plan.shared_size`` (0 for replicate) and its sigmoid gate, zeroed."""
    from ..plan import zeros_tensor

    hidden, width = plan.hidden_size, plan.shared_size
    prefix = f"model.layers.{layer}.mlp."
    return [
        zeros_tensor(prefix + "shared_expert.gate_proj.weight", (width, hidden), plan),
        zeros_tensor(prefix + "shared_expert.up_proj.weight", (width, hidden), plan),
        zeros_tensor(prefix + "shared_expert.down_proj.weight", (hidden, width), plan),
        zeros_tensor(prefix + "shared_expert_gate.weight", (1, hidden), plan),
    ]


TARGET = MoeTarget(
    name="qwen2_moe",
    model_type="qwen2_moe",
    config_class="Qwen2MoeConfig",
    families=("qwen2",),
    router_key="model.layers.{i}.mlp.gate.weight",
    expert_key="model.layers.{i}.mlp.experts.{e}.{proj}.weight",
    proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    moe_config=_moe_config,
    supports_layer_subset=True,
    extra_layer_tensors=_shared_expert,
    description="Qwen2MoeForCausalLM with norm_topk_prob=true; layer_types copied",
)
