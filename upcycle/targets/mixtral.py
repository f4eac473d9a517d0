"""Mixtral: softmax router with renormalised top-k; takes llama, mistral (sliding window) and phi3
(fused qkv/gate_up presented split by the phi3 family; full rotary only)."""

from .base import MoeTarget, PerExpertLayout, Requirement, no_attention_bias


def _moe_config(plan):
    return {
        "num_local_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        # explicit, so rope validation (phi3 longrope) sees it; mixtral derives the same value when absent
        "head_dim": plan.dense_config.get("head_dim") or plan.hidden_size // plan.dense_config["num_attention_heads"],
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
    }


TARGET = MoeTarget(
    name="mixtral",
    config_class="MixtralConfig",
    families=("llama", "mistral", "phi3"),
    layout=PerExpertLayout(
        router_key="model.layers.{i}.block_sparse_moe.gate.weight",
        expert_key="model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    moe_config=_moe_config,
    requirements=(
        Requirement(no_attention_bias, "the dense attention has biases (attention_bias=true), which mixtral lacks"),
    ),
    description="MixtralForCausalLM; sliding window, head_dim and rope parameters are copied",
)
