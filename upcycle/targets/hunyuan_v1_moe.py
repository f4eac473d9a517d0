"""Hunyuan v1 MoE: fp32 softmax router (``gate.wg``), renormalised top-k, plus an always-on
``shared_mlp`` as wide as one expert whose output is added to the routed experts'.

The shared MLP is made exact like this:

* experts of the full dense width (replicate, drop-upcycling): **half/half**. The shared MLP is the
  dense FFN with its down projection halved, and every routed expert's down projection is halved too:
  dense/2 + dense/2. Both halves start from the trained weights and get gradients, whereas a zeroed
  shared MLP (gate, up and down all zero) has zero gradient and would stay dead in fine-tuning.
* narrower experts (a fine-grained split, whose shards already sum to the dense FFN): the shared MLP takes
  the gate/up rows of expert 0's neurons and a **zero** down projection: it adds nothing, yet its down
  projection receives gradients.
* a shared slice chosen by the expert method (``LayerExperts.shared``) of the expert width is written as is.
"""

from __future__ import annotations

import dataclasses

from .base import MoeTarget

MLP = "model.layers.{i}.mlp.shared_mlp.{proj}_proj.weight"


def _moe_config(plan):
    return {
        "num_experts": plan.recipe.num_experts,
        "moe_topk": plan.recipe.top_k,
        "intermediate_size": plan.expert_size,
        "output_router_logits": False,
    }


def _full_width(plan, experts) -> bool:
    return experts.shared is None and all(e.width(plan.dense_size) == plan.dense_size for e in experts.experts)


def _halve_experts(plan, layer, experts):
    """Half/half: the routed experts carry half of the dense FFN, the shared MLP the other half."""
    if not _full_width(plan, experts):
        return experts
    halved = [dataclasses.replace(e, down_scale=e.down_scale * 0.5) for e in experts.experts]
    return dataclasses.replace(experts, experts=halved, notes=[*experts.notes, "shared_mlp: half/half"])


def _shared_mlp(plan, layer):
    from ..errors import RecipeError
    from ..experts import ExpertSlice
    from ..plan import DTYPES, OutTensor, TensorSpec, _expert_maker, zeros_tensor

    experts = plan.layers[layer]
    width = plan.expert_size
    if experts.shared is not None:
        shared, zero_down = experts.shared, False
        if shared.width(plan.dense_size) != width:
            raise RecipeError(f"hunyuan_v1_moe's shared_mlp is as wide as one expert ({width}); "
                              f"the shared expert has {shared.width(plan.dense_size)} neurons")
    elif _full_width(plan, experts):
        shared, zero_down = ExpertSlice(down_scale=0.5), False
    else:
        shared, zero_down = ExpertSlice(neurons=experts.experts[0].neurons), True
    dtype = DTYPES[plan.dtype_name]
    out = []
    for proj in ("gate", "up", "down"):
        key, name = plan.family.mlp_key(layer, proj), MLP.format(i=layer, proj=proj)
        shape = (plan.hidden_size, width) if proj == "down" else (width, plan.hidden_size)
        if zero_down and proj == "down":
            out.append(zeros_tensor(name, shape, plan))
        else:
            out.append(OutTensor(TensorSpec(name, shape, dtype), key, _expert_maker(key, proj, shared, dtype)))
    return out


TARGET = MoeTarget(
    name="hunyuan_v1_moe",
    model_type="hunyuan_v1_moe",
    config_class="HunYuanMoEV1Config",
    families=("hunyuan_v1_dense",),
    router_key="model.layers.{i}.mlp.gate.wg.weight",
    expert_key="model.layers.{i}.mlp.experts.{e}.{proj}.weight",
    proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    moe_config=_moe_config,
    adjust=_halve_experts,
    extra_layer_tensors=_shared_mlp,
    description="HunYuanMoEV1ForCausalLM; the always-on shared_mlp gets half of the dense FFN and every "
                "expert the other half (down projections x 0.5); with experts narrower than the dense FFN "
                "the shared_mlp's down projection is zero instead",
)
