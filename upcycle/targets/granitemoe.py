"""GraniteMoE: the Granite decoder (multipliers copied) with packed experts: per layer
``input_linear [E, 2F, H]`` (gate rows, then up rows) and ``output_linear [E, H, F]``; its router
takes top-k logits and softmaxes over them, so the weights are renormalised."""

from .base import MoeTarget, PackedLayout


def _moe_config(plan):
    return {
        "num_local_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        "output_router_logits": False,
    }


TARGET = MoeTarget(
    name="granitemoe",
    config_class="GraniteMoeConfig",
    families=("granite",),
    layout=PackedLayout(
        router_key="model.layers.{i}.block_sparse_moe.router.layer.weight",
        packed={
            "model.layers.{i}.block_sparse_moe.input_linear.weight": ("gate", "up"),
            "model.layers.{i}.block_sparse_moe.output_linear.weight": ("down",),
        },
    ),
    moe_config=_moe_config,
    description="GraniteMoeForCausalLM; embedding/residual/attention/logit multipliers copied",
)
