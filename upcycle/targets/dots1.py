"""dots.llm1 (dots1): Qwen3 attention with DeepSeek-style MoE: sigmoid router, ``e_score_correction_bias``
(written zero), group-limited top-k (one group here), ``norm_topk_prob=true`` and
``routed_scaling_factor=1`` (so the top-k weights sum to one), plus always-on shared experts.

The shared experts are filled as :mod:`._shared_mlp` explains (the method's shared slice, else half/half
with full-width experts). With narrower experts they are one expert wide with a zero down projection.
``--target auto`` keeps qwen3 on qwen3_moe; ask for this one explicitly.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..tensors import zeros_tensor
from . import _shared_mlp
from .base import MLP_EXPERTS_LAYOUT, MoeTarget

LAYOUT = {f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight": (p,) for p in ("gate", "up", "down")}


def _num_shared(plan) -> int:
    """``n_shared_experts``: the shared MLP's width in expert widths."""
    width = _shared_mlp.width(plan) or plan.expert_size
    if width % plan.expert_size:
        raise RecipeError(f"dots1's shared experts are a multiple of the expert width ({plan.expert_size}); "
                          f"the shared slice has {width} neurons")
    return width // plan.expert_size


def _moe_config(plan):
    return {
        "n_routed_experts": plan.recipe.num_experts,
        "num_experts_per_tok": plan.recipe.top_k,
        "moe_intermediate_size": plan.expert_size,
        "intermediate_size": plan.dense_size,
        "n_shared_experts": _num_shared(plan),
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0,
        "output_router_logits": False,
    }


def _extra(plan, layer):
    bias = zeros_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias", (plan.recipe.num_experts,),
                        plan.dtype)
    return [bias, *_shared_mlp.expert_wide_tensors(plan, layer, LAYOUT)]


TARGET = MoeTarget(
    name="dots1",
    config_class="Dots1Config",
    families=("qwen3",),
    layout=MLP_EXPERTS_LAYOUT,
    moe_config=_moe_config,
    adjust=_shared_mlp.halve_full_width,
    extra_layer_tensors=_extra,
    copy_keys=("head_dim",),
    description="Dots1ForCausalLM with norm_topk_prob=true, routed_scaling_factor=1, one routing group; the "
                "shared experts get half of the dense FFN and every routed expert the other half",
)
