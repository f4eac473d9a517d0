"""Always-on shared MLPs (hunyuan_v1_moe's ``shared_mlp``, granitemoeshared's) made exact.

Which neurons the shared MLP holds, in this order:

* a shared slice chosen by the expert method (``LayerExperts.shared``): written as is;
* experts of the full dense width (replicate, drop-upcycling): **half/half**. The shared MLP is the dense
  FFN with its down projection halved and every routed expert's down projection is halved too:
  dense/2 + dense/2. Both halves start from the trained weights and get gradients, whereas a zeroed
  shared MLP (gate, up and down all zero) has zero gradient and stays dead in fine-tuning;
* otherwise (narrower experts that already sum to the dense FFN): none, ``None`` is returned.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import RecipeError
from ..tensors import ExpertSlice
from .base import packed_slices

HALF = 0.5


def full_width(plan, experts) -> bool:
    return experts.shared is None and all(e.width(plan.dense_size) == plan.dense_size for e in experts.experts)


def halve_full_width(plan, layer, experts):
    """``MoeTarget.adjust`` hook: routed experts keep half of a full-width FFN, the shared MLP the rest."""
    if not full_width(plan, experts):
        return experts
    halved = [dataclasses.replace(e, down_scale=e.down_scale * HALF) for e in experts.experts]
    return dataclasses.replace(experts, experts=halved)


def shared_slice(plan, layer):
    """The shared MLP's slice of the dense FFN for ``layer``, or None when it should hold nothing."""
    experts = plan.layers[layer]
    if experts.shared is not None:
        return experts.shared
    if all(e.width(plan.dense_size) == plan.dense_size for e in experts.experts):
        return ExpertSlice(down_scale=HALF)
    return None


def expert_wide_tensors(plan, layer: int, layout: dict[str, tuple[str, ...]]) -> list:
    """A shared MLP that must be one expert wide: the shared slice, else expert 0's gate/up rows with a
    zero down projection (adds nothing, yet its down projection gets gradients)."""
    sl = shared_slice(plan, layer)
    if sl is None:
        first = ExpertSlice(neurons=plan.layers[layer].experts[0].neurons)
        return slice_tensors(plan, layer, layout, first, zero_down=True)
    if sl.width(plan.dense_size) % plan.expert_size:
        raise RecipeError(f"{plan.target.name}'s shared MLP is a multiple of the expert width ({plan.expert_size}); "
                          f"the shared expert has {sl.width(plan.dense_size)} neurons")
    return slice_tensors(plan, layer, layout, sl)


def slice_tensors(plan, layer: int, layout: dict[str, tuple[str, ...]], sl, zero_down: bool = False) -> list:
    """The tensors of one MLP made of slice ``sl`` of the dense FFN, laid out like a packed layout (each
    template's projections concatenated along rows), with an optional zero down projection."""
    return [packed_slices(plan, template.format(i=layer), layer, projs, [sl], zero_down=zero_down, stacked=False)
            for template, projs in layout.items()]


def width(plan) -> int:
    """The shared MLP width the config declares (the same in every MoE layer), 0 when there is none."""
    sl: Optional[object] = shared_slice(plan, plan.moe_layers[0]) if plan.moe_layers else None
    return 0 if sl is None else sl.width(plan.dense_size)
