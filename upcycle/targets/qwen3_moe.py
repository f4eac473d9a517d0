"""Qwen3-MoE: renormalised top-k (norm_topk_prob=true), q/k norm; one sliding window for all layers."""

from .base import MLP_EXPERTS_LAYOUT, MoeTarget, Requirement


def _uniform_attention(cfg):
    kinds = set(cfg.get("layer_types") or ["full_attention"])
    return len(kinds) == 1


def _moe_config(plan):
    return {
        "num_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "moe_intermediate_size": plan.expert_size,
        "intermediate_size": plan.dense_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": plan.dense_layers,
        "output_router_logits": False,
    }


TARGET = MoeTarget(
    name="qwen3_moe",
    config_class="Qwen3MoeConfig",
    families=("qwen3",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    requirements=(
        Requirement(_uniform_attention, "the dense model mixes sliding-window and full-attention layers, "
                                         "which qwen3_moe cannot express (one window for all layers)"),
    ),
    supports_layer_subset=True,
    copy_keys=("head_dim",),
    description="Qwen3MoeForCausalLM with norm_topk_prob=true",
)
