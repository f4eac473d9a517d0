"""An MoE export format described as data: a small core (config class, exactness conditions, config
keys) plus a layout of one of three explicit kinds, and the bundled model as its own type.

Layouts (how one MoE layer's router and routed experts are named and shaped on disk):

* :class:`PerExpertLayout`: one tensor per expert and projection (Mixtral, Qwen-MoE, ...);
* :class:`PackedLayout`: all experts of a layer packed in a few ``[E, rows, cols]`` tensors (GraniteMoE);
* :class:`CustomLayout`: a function writes the experts (the bundled model: biases, shared experts).

Targets only see the plan through the attributes documented on ``ConversionPlan`` (family, sizes,
dtype, ``layers``); they never import planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Union

from ..families import PROJECTIONS
from ..layers import select_layers
from ..tensors import ExpertSlice, OutTensor, expert_tensor, packed_tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import ConversionPlan
    from ..tensors import LayerExperts


@dataclass(frozen=True)
class Requirement:
    """A condition on the dense config that the target needs to reproduce the dense model exactly."""

    holds: Callable[[dict[str, Any]], bool]
    reason: str


def no_attention_bias(cfg: dict[str, Any]) -> bool:
    return not cfg.get("attention_bias", False)


def no_mlp_bias(cfg: dict[str, Any]) -> bool:
    return not cfg.get("mlp_bias", False)


def full_rotary(cfg: dict[str, Any]) -> bool:
    """Rotary embeddings on the whole head (the factor sits at top level or, in v5, in rope_parameters)."""
    factors = [cfg.get("partial_rotary_factor"), (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")]
    return all(float(f or 1.0) == 1.0 for f in factors)


COMMON_REQUIREMENTS = (
    Requirement(no_mlp_bias, "the dense MLP has biases (mlp_bias=true), which {target} experts cannot hold"),
    Requirement(full_rotary, "the dense model uses partial rotary embeddings, which {target} does not implement"),
)


def slice_tensor(plan: "ConversionPlan", name: str, layer: int, proj: str, sl: ExpertSlice, *,
                 kind: str = "weight", zero: bool = False, expert_of: Optional[int] = None) -> OutTensor:
    """:func:`upcycle.tensors.expert_tensor` with the plan's family, dtype and sizes."""
    return expert_tensor(name, plan.family, layer, proj, sl, plan.dtype, plan.hidden_size, plan.dense_size,
                         kind=kind, zero=zero, expert_of=expert_of)


def packed_slices(plan: "ConversionPlan", name: str, layer: int, projs: tuple[str, ...], slices: list[ExpertSlice],
                  **kwargs: Any) -> OutTensor:
    """:func:`upcycle.tensors.packed_tensor` with the plan's family, dtype and sizes."""
    return packed_tensor(name, plan.family, layer, projs, slices, plan.dtype, plan.hidden_size, plan.dense_size,
                         **kwargs)


@dataclass(frozen=True)
class PerExpertLayout:
    """Keys are templates with ``{i}`` (layer), ``{e}`` (expert) and ``{proj}`` (the target's name for a
    projection, from ``proj_names``)."""

    router_key: str
    expert_key: str
    proj_names: dict[str, str]

    def router_name(self, plan: "ConversionPlan", layer: int) -> str:
        return self.router_key.format(i=layer)

    def expert_tensors(self, plan: "ConversionPlan", layer: int, infos: dict) -> list[OutTensor]:
        """Projection by projection, so each dense matrix is read once for all experts."""
        return [slice_tensor(plan, self.expert_key.format(i=layer, e=e, proj=self.proj_names[proj]), layer, proj, sl,
                             expert_of=layer)
                for proj in PROJECTIONS for e, sl in enumerate(plan.layers[layer].experts)]

    def describe(self) -> str:
        return f"`{self.expert_key.format(i='N', e='E', proj='{' + ','.join(self.proj_names.values()) + '}')}`"


@dataclass(frozen=True)
class PackedLayout:
    """``packed`` maps a per-layer key template to the projections it packs for all experts at once:
    ``[E, rows, cols]``, the listed projections concatenated along rows (gate then up -> ``[E, 2F, H]``)."""

    router_key: str
    packed: dict[str, tuple[str, ...]]

    def router_name(self, plan: "ConversionPlan", layer: int) -> str:
        return self.router_key.format(i=layer)

    def expert_tensors(self, plan: "ConversionPlan", layer: int, infos: dict) -> list[OutTensor]:
        slices = plan.layers[layer].experts
        return [packed_slices(plan, template.format(i=layer), layer, projs, slices, expert_of=layer)
                for template, projs in self.packed.items()]

    def describe(self) -> str:
        parts = [f"`{t.format(i='N')}` = {' + '.join(p)} of all experts" for t, p in self.packed.items()]
        return "packed: " + "; ".join(parts)


@dataclass(frozen=True)
class CustomLayout:
    """A layout written by functions: ``router_name(plan, layer)`` and ``expert_tensors(plan, layer, infos)``
    (the routed experts and anything else of the MoE block, after the router). ``router_key`` and
    ``summary`` describe the names for the docs."""

    router_key: str
    router_name: Callable[["ConversionPlan", int], str]
    expert_tensors: Callable[["ConversionPlan", int, dict], list[OutTensor]]
    summary: str = ""

    def describe(self) -> str:
        return self.summary


Layout = Union[PerExpertLayout, PackedLayout, CustomLayout]


#: The per-expert layout most transformers MoE classes save (Qwen-MoE style): router ``mlp.gate``,
#: experts ``mlp.experts.E.{gate,up,down}_proj``.
MLP_EXPERTS_LAYOUT = PerExpertLayout(
    router_key="model.layers.{i}.mlp.gate.weight",
    expert_key="model.layers.{i}.mlp.experts.{e}.{proj}.weight",
    proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
)


@dataclass(frozen=True)
class MoeTarget:
    """A transformers MoE architecture that upcycle writes.

    ``moe_config`` returns the MoE-specific config keys; the rest are copied from the dense config where the
    target's config class knows them (plus ``copy_keys``), then ``config_defaults`` and the MoE keys apply.
    ``adjust`` may rewrite a layer's experts (e.g. scale them to make room for an always-on MLP);
    ``extra_layer_tensors`` adds tensors after the experts of each MoE layer (shared experts, biases).
    """

    name: str
    config_class: str
    families: tuple[str, ...]
    layout: Layout
    moe_config: Callable[["ConversionPlan"], dict[str, Any]]
    description: str = ""
    requirements: tuple[Requirement, ...] = ()
    renormalises_top_k: bool = True
    supports_layer_subset: bool = False
    extra_layer_tensors: Optional[Callable[["ConversionPlan", int], list[OutTensor]]] = None
    config_defaults: dict[str, Any] = field(default_factory=dict)
    #: dense config keys to carry over although the target's config class does not list them by default
    copy_keys: tuple[str, ...] = ()
    adjust: Optional[Callable[["ConversionPlan", int, "LayerExperts"], "LayerExperts"]] = None
    #: factor on a carved-out shared expert's down projection that makes it exact (2.0 behind a sigmoid
    #: gate whose weights are zeroed); None when the target does not take ``--shared-experts``
    shared_expert_scale: Optional[float] = None

    #: a transformers architecture: COMMON_REQUIREMENTS apply (the bundled model has its own)
    native: ClassVar[bool] = True
    #: the experts can hold the dense MLP biases
    supports_mlp_bias: ClassVar[bool] = False
    #: dense tensors that the family splits (Phi-3 qkv_proj, gate_up_proj) are written fused, as stored
    keeps_fused: ClassVar[bool] = False

    def explain(self, family_name: str, config: dict[str, Any]) -> Optional[str]:
        """Why this target cannot reproduce the dense model exactly, or None when it can."""
        if family_name not in self.families:
            return (f"target {self.name!r} does not take the {family_name!r} family "
                    f"(it takes: {', '.join(self.families)})")
        for req in (COMMON_REQUIREMENTS if self.native else ()) + self.requirements:
            if not req.holds(config):
                return req.reason.format(target=self.name)
        return None

    def adjust_experts(self, plan: "ConversionPlan", layer: int, experts: "LayerExperts") -> "LayerExperts":
        return experts if self.adjust is None else self.adjust(plan, layer, experts)

    def explain_recipe(self, recipe: Any, num_layers: int) -> Optional[str]:
        """Why this target cannot hold the recipe's layout (a layer subset, carved-out shared experts)."""
        if len(select_layers(recipe.layers, num_layers)) != num_layers and not self.supports_layer_subset:
            return (f"--layers {recipe.layers}: {self.name} puts an MoE block in every layer and cannot keep "
                    "layers dense")
        if recipe.option("shared_experts") and self.shared_expert_scale is None:
            return f"--shared-experts: {self.name} has no shared expert to carve out of the FFN"
        return None

    def layer_tensors(self, plan: "ConversionPlan", layer: int, infos: dict) -> list[OutTensor]:
        """The routed experts and the target's extra tensors of one MoE layer (the router comes first,
        from planning)."""
        out = self.layout.expert_tensors(plan, layer, infos)
        if self.extra_layer_tensors is not None:
            out.extend(self.extra_layer_tensors(plan, layer))
        return out

    @property
    def architecture(self) -> str:
        """The model class it writes, e.g. ``MixtralForCausalLM`` (from ``config_class``)."""
        return self.config_class.replace("Config", "ForCausalLM")

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)

    def build_config(self, plan: "ConversionPlan") -> Any:
        """The target's config: dense keys the target class knows, then the MoE keys."""
        cls = self.config_cls()
        known = cls().to_dict()
        skip = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "dtype",
                "torch_dtype", "id2label", "label2id"}
        kwargs = {k: v for k, v in plan.dense_config.items()
                  if (k in known or k in self.copy_keys) and k not in skip}
        kwargs.update(self.config_defaults)
        kwargs.update(self.moe_config(plan))
        config = cls(**kwargs)
        config.architectures = [self.architecture]
        config.dtype = plan.dtype_name
        return config

    def write_extra_files(self, folder: Any, plan: "ConversionPlan") -> list[str]:
        """Files beside the weights other than config, tokenizer, card and recipe; returns their names."""
        return []


@dataclass(frozen=True)
class BundledTarget(MoeTarget):
    """upcycle's own MoE model: every family, MLP biases, fused tensors kept; its own config and remote code."""

    native: ClassVar[bool] = False
    supports_mlp_bias: ClassVar[bool] = True
    keeps_fused: ClassVar[bool] = True
    build: Optional[Callable[["ConversionPlan"], Any]] = None
    files: Optional[Callable[[Any, "ConversionPlan"], list[str]]] = None

    def build_config(self, plan: "ConversionPlan") -> Any:
        return self.build(plan)

    def write_extra_files(self, folder: Any, plan: "ConversionPlan") -> list[str]:
        return self.files(folder, plan)
