"""ERNIE 4.5 MoE: fp32 softmax router, renormalised top-k, a zero ``e_score_correction_bias``
(``moe_statics``) per layer; MoE layers are every layer from ``moe_layer_start_index`` = 0."""

from ..tensors import zeros_tensor
from .base import MLP_EXPERTS_LAYOUT, MoeTarget, Requirement


def _no_bias(cfg):
    return not cfg.get("use_bias", False)


def _moe_config(plan):
    return {
        "moe_num_experts": plan.recipe.num_experts,
        "moe_k": plan.recipe.top_k,
        "moe_intermediate_size": plan.expert_size,
        "intermediate_size": plan.dense_size,
        "moe_num_shared_experts": 0,
        "moe_layer_start_index": 0,
        "moe_layer_end_index": plan.num_layers - 1,
        "moe_layer_interval": 1,
        "output_router_logits": False,
    }


def _correction_bias(plan, layer):
    """The router's selection bias, zero: selection is then by the softmax scores alone."""
    return [zeros_tensor(f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias",
                         (1, plan.recipe.num_experts), plan.dtype)]


TARGET = MoeTarget(
    name="ernie4_5_moe",
    config_class="Ernie4_5_MoeConfig",
    families=("ernie4_5",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    requirements=(
        Requirement(_no_bias, "the dense model has biases (use_bias=true), including on its MLP, "
                              "which {target} experts cannot hold"),
    ),
    extra_layer_tensors=_correction_bias,
    copy_keys=("head_dim",),
    description="Ernie4_5_MoeForCausalLM, no shared experts, every layer MoE",
)
