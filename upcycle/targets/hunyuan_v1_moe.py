"""Hunyuan v1 MoE: fp32 softmax router (``gate.wg``), renormalised top-k, plus an always-on
``shared_mlp`` as wide as one expert whose output is added to the routed experts'.

The shared MLP is filled as :mod:`._shared_mlp` explains (a method's shared slice, else half/half with
full-width experts). With experts narrower than the dense FFN it takes expert 0's gate/up rows and a
**zero** down projection: it adds nothing, yet its down projection still gets gradients.
"""

from __future__ import annotations

from . import _shared_mlp
import dataclasses

from ..errors import RecipeError
from .base import MLP_EXPERTS_LAYOUT, MoeTarget

LAYOUT = {f"model.layers.{{i}}.mlp.shared_mlp.{p}_proj.weight": (p,) for p in ("gate", "up", "down")}


def _moe_config(plan):
    return {
        "num_experts": plan.recipe.num_experts,
        "moe_topk": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        "output_router_logits": False,
    }


def _shared_mlp_tensors(plan, layer):
    sl = _shared_mlp.shared_slice(plan, layer)
    if sl is not None and sl.width(plan.dense_size) != plan.expert_size:
        raise RecipeError(f"hunyuan_v1_moe's shared_mlp is as wide as one expert ({plan.expert_size}); "
                          f"the shared expert has {sl.width(plan.dense_size)} neurons")
    return _shared_mlp.expert_wide_tensors(plan, layer, LAYOUT)


TARGET = MoeTarget(
    name="hunyuan_v1_moe",
    config_class="HunYuanMoEV1Config",
    families=("hunyuan_v1_dense",),
    layout=dataclasses.replace(MLP_EXPERTS_LAYOUT, router_key="model.layers.{i}.mlp.gate.wg.weight"),
    moe_config=_moe_config,
    adjust=_shared_mlp.halve_full_width,
    extra_layer_tensors=_shared_mlp_tensors,
    description="HunYuanMoEV1ForCausalLM; the always-on shared_mlp gets half of the dense FFN and every "
                "expert the other half (down projections x 0.5); with experts narrower than the dense FFN "
                "the shared_mlp's down projection is zero instead",
)
