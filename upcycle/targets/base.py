"""An MoE export format described as data: config class, key layout, exactness conditions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from ..experts import LayerExperts
    from ..plan import ConversionPlan, OutTensor


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


#: The per-expert layout most transformers MoE classes save (Qwen-MoE style): router ``mlp.gate``,
#: experts ``mlp.experts.E.{gate,up,down}_proj``. Targets spread it into ``MoeTarget(**MLP_EXPERTS_LAYOUT, ...)``.
MLP_EXPERTS_LAYOUT: dict[str, Any] = {
    "router_key": "model.layers.{i}.mlp.gate.weight",
    "expert_key": "model.layers.{i}.mlp.experts.{e}.{proj}.weight",
    "proj_names": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}


@dataclass(frozen=True)
class MoeTarget:
    """A transformers MoE architecture that upcycle writes.

    Keys are templates with ``{i}`` (layer), ``{e}`` (expert) and ``{proj}`` (the target's name for a
    projection, from ``proj_names``). ``moe_config`` returns the MoE-specific config keys; the rest are
    copied from the dense config where the target's config class knows them.

    ``packed_experts`` (instead of ``expert_key``) maps a per-layer key template to the projections it
    packs for all experts at once: ``[E, rows, cols]``, the listed projections concatenated along rows.
    ``adjust`` may rewrite a layer's experts (e.g. scale them to make room for an always-on MLP).
    """

    name: str
    model_type: str
    config_class: str
    families: tuple[str, ...]
    router_key: str
    expert_key: str
    proj_names: dict[str, str]
    moe_config: Callable[["ConversionPlan"], dict[str, Any]]
    requirements: tuple[Requirement, ...] = ()
    renormalises_top_k: bool = True
    supports_layer_subset: bool = False
    extra_layer_tensors: Optional[Callable[["ConversionPlan", int], list["OutTensor"]]] = None
    description: str = ""
    config_defaults: dict[str, Any] = field(default_factory=dict)
    #: dense config keys to carry over although the target's config class does not list them by default
    copy_keys: tuple[str, ...] = ()
    packed_experts: Optional[dict[str, tuple[str, ...]]] = None
    adjust: Optional[Callable[["ConversionPlan", int, "LayerExperts"], "LayerExperts"]] = None
    #: a transformers architecture: COMMON_REQUIREMENTS apply (the bundled model sets False, it has its own)
    native: bool = True
    #: factor on a carved-out shared expert's down projection that makes it exact (2.0 behind a sigmoid
    #: gate whose weights are zeroed); None when the target does not take ``--shared-experts``
    shared_expert_scale: Optional[float] = None
    #: the experts can hold the dense MLP biases
    supports_mlp_bias: bool = False
    #: replaces the generic router + experts layout of an MoE layer: (plan, layer, infos, dtype) -> tensors
    layer_tensors: Optional[Callable[..., list["OutTensor"]]] = None
    #: builds the output config object itself instead of copying keys into ``config_class``
    make_config: Optional[Callable[["ConversionPlan"], Any]] = None
    #: dense tensors that the family splits (Phi-3 qkv_proj, gate_up_proj) are written fused, as stored
    keeps_fused: bool = False
    #: writes extra files (e.g. remote code) into the output folder; returns their names
    extra_files: Optional[Callable[[Any, "ConversionPlan"], list[str]]] = None

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
        from ..layers import select_layers

        if len(select_layers(recipe.layers, num_layers)) != num_layers and not self.supports_layer_subset:
            return (f"--layers {recipe.layers}: {self.name} puts an MoE block in every layer and cannot keep "
                    "layers dense")
        if recipe.shared_experts and self.shared_expert_scale is None:
            return f"--shared-experts: {self.name} has no shared expert to carve out of the FFN"
        return None

    def expert_tensor_name(self, layer: int, expert: int, proj: str) -> str:
        return self.expert_key.format(i=layer, e=expert, proj=self.proj_names[proj])

    def router_tensor_name(self, layer: int) -> str:
        return self.router_key.format(i=layer)

    @property
    def architecture(self) -> str:
        """The model class it writes, e.g. ``MixtralForCausalLM`` (from ``config_class``)."""
        return self.config_class.replace("Config", "ForCausalLM")

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)
