"""FlexOlmo: the OLMo 2 decoder (q/k norm, post-attention and post-FFN norms) with a softmax router;
exact with ``norm_topk_prob=true``. Its ``intermediate_size`` is the expert width."""

from .base import MLP_EXPERTS_LAYOUT, MoeTarget


def _moe_config(plan):
    return {
        "num_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        "norm_topk_prob": True,
        "output_router_logits": False,
    }


TARGET = MoeTarget(
    name="flex_olmo",
    config_class="FlexOlmoConfig",
    families=("olmo2",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    description="FlexOlmoForCausalLM with norm_topk_prob=true",
)
