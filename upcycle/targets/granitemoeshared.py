"""GraniteMoeShared: granitemoe (packed experts) plus an always-on shared MLP, packed the same way:
``shared_mlp.input_linear [2S, H]`` (gate then up) and ``shared_mlp.output_linear [H, S]``.

The shared MLP is filled as :mod:`._shared_mlp` explains: the method's shared slice, else half/half with
full-width experts (S = the dense width), else none (``shared_intermediate_size`` = 0). ``--target auto``
keeps granitemoe, which is exact without a shared MLP; ask for this one explicitly.
"""

from . import _shared_mlp
from .base import MoeTarget
from .granitemoe import TARGET as GRANITEMOE

LAYOUT = {"model.layers.{i}.shared_mlp.input_linear.weight": ("gate", "up"),
          "model.layers.{i}.shared_mlp.output_linear.weight": ("down",)}


def _moe_config(plan):
    return {**GRANITEMOE.moe_config(plan), "shared_intermediate_size": _shared_mlp.width(plan)}


def _shared_mlp_tensors(plan, layer):
    sl = _shared_mlp.shared_slice(plan, layer)
    return [] if sl is None else _shared_mlp.slice_tensors(plan, layer, LAYOUT, sl)


TARGET = MoeTarget(
    name="granitemoeshared",
    config_class="GraniteMoeSharedConfig",
    families=("granite",),
    layout=GRANITEMOE.layout,
    moe_config=_moe_config,
    adjust=_shared_mlp.halve_full_width,
    extra_layer_tensors=_shared_mlp_tensors,
    description="GraniteMoeSharedForCausalLM; the shared MLP gets half of the dense FFN and every expert the "
                "other half (down projections x 0.5), or the expert method's shared slice",
)
