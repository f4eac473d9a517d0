"""The bundled model (``upcycle_moe``): the dense family's own architecture with MoE blocks in place of MLPs.

Takes every family, with MLP biases, non-gated MLPs, partial rotary and any attention variant, because
everything outside the MLP is the dense model's own code. Writes the dense keys unchanged and, per MoE
layer (``P`` = the family's MLP path, e.g. ``model.layers.3.mlp``, ``transformer.h.3.mlp``)::

    P.router.weight                                     [E, H]
    P.experts.{e}.{gate_proj,up_proj,down_proj}.weight  nn.Linear orientation ([F, H], [F, H], [H, F])
    P.experts.{e}.{...}.bias                            when the dense MLP has biases
    P.shared_experts.{...}                              when the method asks for a shared expert

Conv1D weights (GPT-2) are transposed and fused ``gate_up_proj`` (Phi-3) split while streaming; fused
tensors outside the MoE blocks (Phi-3 ``qkv_proj``, dense layers' ``gate_up_proj``) are written as stored. The
checkpoint carries the self-contained modeling files and an ``auto_map`` for ``trust_remote_code``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import RecipeError
from ..families import all_families
from ..modeling import AUTO_MAP, remote_code_sources
from ..modeling.configuration_upcycle_moe import UpcycleMoeConfig
from .base import BundledTarget, CustomLayout, slice_tensor

_TEXT_CONFIG_SKIP = ("architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype")
_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _mlp_prefix(plan, layer: int) -> str:
    return f"{plan.family.layer_prefix.format(i=layer)}{plan.family.mlp_module}."


def _expert_tensors(plan, layer: int, infos, name: str, sl, down_bias: bool, expert_of) -> list:
    """One expert's weights and biases in nn.Linear orientation; the down bias is zero unless ``down_bias``."""
    out = []
    for proj in plan.family.mlp:
        for kind in ("weight", "bias"):
            if plan.family.mlp_key(layer, proj, kind) not in infos:
                continue
            zero = kind == "bias" and proj == "down" and not down_bias
            out.append(slice_tensor(plan, f"{name}.{_NAMES[proj]}.{kind}", layer, proj, sl, kind=kind, zero=zero,
                                    expert_of=expert_of))
    return out


def router_name(plan, layer: int) -> str:
    return _mlp_prefix(plan, layer) + "router.weight"


def expert_tensors(plan, layer: int, infos) -> list:
    """Routed experts and the optional shared expert of one MoE layer, projection by projection.

    The dense down-projection bias goes to every routed expert (their weights sum to one), and to the
    shared expert only when there are no routed experts to carry it.
    """
    prefix, experts = _mlp_prefix(plan, layer), plan.layers[layer]
    routed = [_expert_tensors(plan, layer, infos, f"{prefix}experts.{e}", sl, True, layer)
              for e, sl in enumerate(experts.experts)]
    # interleave by projection so each dense matrix is read once for all experts (the cache holds a few)
    out = [tensors[index] for index in range(len(routed[0]) if routed else 0) for tensors in routed]
    if experts.shared is not None:
        out.extend(_expert_tensors(plan, layer, infos, prefix + "shared_experts", experts.shared,
                                   not experts.experts, None))
    return out


def _shared_width(plan) -> int:
    widths = {l.shared.width(plan.dense_size) for l in plan.layers.values() if l.shared is not None}
    if len(widths) > 1:
        raise RecipeError(f"the upcycle target needs one shared-expert width, got {sorted(widths)}")
    return widths.pop() if widths else 0


def make_config(plan):
    """``UpcycleMoeConfig`` around the dense config."""
    dense = {k: v for k, v in plan.dense_config.items() if k not in _TEXT_CONFIG_SKIP}
    biased = any(t.spec.name.endswith(".bias") and ".experts." in t.spec.name for t in plan.tensors)
    dropout_key = plan.family.mlp_dropout_key
    config = UpcycleMoeConfig(
        text_config=dense,
        layers_module=plan.family.layers_module,
        mlp_module=plan.family.mlp_module,
        moe_layers=sorted(plan.layers),
        num_experts=plan.recipe.num_experts,
        num_experts_per_tok=plan.recipe.top_k,
        moe_intermediate_size=plan.expert_size,
        shared_expert_intermediate_size=_shared_width(plan),
        hidden_act=plan.family.activation(plan.dense_config),
        mlp_gated=plan.family.gated,
        mlp_bias=biased,
        mlp_dropout=float(plan.dense_config.get(dropout_key) or 0.0) if dropout_key else 0.0,
        router_type="softmax",
        norm_topk_prob=True,
        tie_word_embeddings=bool(plan.dense_config.get("tie_word_embeddings", False)),
    )
    config.architectures = ["UpcycleMoeForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = plan.dtype_name
    return config


def copy_remote_code(folder: Path, plan) -> list[str]:
    """Copy the self-contained configuration and modeling files next to the weights."""
    for name, source in remote_code_sources().items():
        shutil.copyfile(source, Path(folder) / name)
    return list(remote_code_sources())


TARGET = BundledTarget(
    name="upcycle",
    config_class="UpcycleMoeConfig",
    families=tuple(all_families()),
    layout=CustomLayout("<mlp>.router.weight", router_name, expert_tensors,
                        summary="`<mlp>.experts.E.{gate_proj,up_proj,down_proj}.weight`"),
    moe_config=lambda plan: {},
    supports_layer_subset=True,
    shared_expert_scale=1.0,  # the shared expert is added ungated
    build=make_config,
    files=copy_remote_code,
    description="UpcycleMoeForCausalLM (bundled, loads with trust_remote_code or after `import upcycle`); "
                "every dense family, MLP biases, non-gated MLPs, partial rotary",
)
