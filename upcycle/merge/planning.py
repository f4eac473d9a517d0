"""The merge as a conversion plan: the converter's plan of output tensors with each expert read from its
source (:attr:`ExpertSlice.source`) and the router tensors replaced by the merge's router rows."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from ..errors import UnsupportedArchitectureError
from ..experts import ExpertSlice, LayerExperts, MethodContext
from ..families import family_for_model_type
from ..plan import ConversionPlan, make_plan
from ..recipe import Recipe
from ..targets import MoeTarget, all_targets, auto_candidates
from .config import MergeConfig


def recipe_for(config: MergeConfig, target: str) -> Recipe:
    """The converter recipe the plan is made with (every layer MoE, one expert per config entry)."""
    router = config.router_init if config.router_init in ("normal", "zeros") else "zeros"
    return Recipe(num_experts=len(config.experts), top_k=config.top_k, method="replicate", target=target,
                  router_init=router, router_std=float(config.router_std), seed=config.seed, dtype=config.dtype,
                  max_shard_size=config.max_shard_size).validate()


def merge_reason(target: MoeTarget, config: MergeConfig) -> Optional[str]:
    """Why ``target`` cannot hold this merge (beyond the converter's own checks), or None."""
    has_shared_mlp = target.shared_expert_scale is not None or target.adjust is not None
    if config.shared_expert is not None and not has_shared_mlp:
        return f"{target.name} has no shared expert to hold shared_expert {config.shared_expert.source}"
    if config.shared_expert is None and target.adjust is not None:
        return (f"{target.name}'s always-on shared MLP would hold half of the base's FFN and halve every expert; "
                "give a shared_expert, or use another target")
    return None


def choose_merge_target(config: MergeConfig, family: Any, cfg: dict[str, Any], num_layers: int) -> str:
    """``auto``: the first target ``convert`` would try that takes the family exactly and can hold the merge;
    a named target is checked the same way."""
    recipe = recipe_for(config, "auto")
    if config.target != "auto":
        target = all_targets().get(config.target)
        why = target and merge_reason(target, config)
        if why:
            raise UnsupportedArchitectureError(f"target {config.target} cannot hold this merge: {why}")
        return config.target
    reasons = []
    for target in auto_candidates(family):
        why = (target.explain(family.name, cfg) or target.explain_recipe(recipe, num_layers)
               or merge_reason(target, config))
        if why is None:
            return target.name
        reasons.append(why)
    raise UnsupportedArchitectureError(f"no target can hold this {family.name} merge: {'; '.join(reasons)}")


def expert_builder(config: MergeConfig, ids: dict[str, str]) -> Callable[[MethodContext], LayerExperts]:
    """Experts of one layer: expert e is source e's FFN (down projection scaled, noise added as configured)."""

    def build(ctx: MethodContext) -> LayerExperts:
        experts = [ExpertSlice(source=ids[e.source], down_scale=e.residual_scale, noise_std=e.noise_std,
                               seed=(config.seed * 1_000_003 + ctx.layer * 1009 + index) % 2**62)
                   for index, e in enumerate(config.experts)]
        shared = ExpertSlice(source=ids[config.shared_expert.source]) if config.shared_expert else None
        return LayerExperts(experts=experts, groups=list(range(len(experts))), shared=shared)

    return build


def plan_merge(config: MergeConfig, base_config: Any, infos: dict[str, Any], ids: dict[str, str]) -> ConversionPlan:
    """The converter's plan for this merge, read from configs and tensor headers only."""
    cfg = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    family = family_for_model_type(cfg.get("model_type", ""))
    try:
        target = choose_merge_target(config, family, cfg, family.num_layers(cfg))
        return make_plan(cfg, infos, recipe_for(config, target), layer_experts=expert_builder(config, ids))
    except UnsupportedArchitectureError as exc:
        if config.format == "mergekit" and config.target != "auto":  # the target came from `architecture`
            raise UnsupportedArchitectureError(f"architecture (target {config.target}): {exc}") from None
        raise


def with_router_rows(plan: ConversionPlan, rows: dict[int, torch.Tensor]) -> ConversionPlan:
    """The plan with each MoE layer's router tensor made from ``rows[layer]`` ([E, H], float32)."""
    dtype = plan.dtype
    names = {plan.target.layout.router_name(plan, layer): layer for layer in plan.moe_layers}
    tensors, found = [], set()
    for tensor in plan.tensors:
        layer = names.get(tensor.spec.name)
        if layer is not None:
            found.add(layer)
            tensor = dataclasses.replace(tensor, make=lambda cache, r=rows[layer]: r.to(dtype).contiguous())
        tensors.append(tensor)
    missing = sorted(set(plan.moe_layers) - found)
    if missing:  # pragma: no cover - a target whose router key the planner does not know
        raise RuntimeError(f"router tensors of layers {missing} not found in the {plan.target.name} plan")
    return dataclasses.replace(plan, tensors=tensors)


def summary(plan: ConversionPlan, config: MergeConfig, specs: list[str]) -> dict[str, Any]:
    """The converter's summary, with the merge's method, router init, sources and exactness."""
    out = plan.summary()
    out.update(method="merge", router_init=config.router_init, shared_weights=config.shared_weights,
               base_model=config.base, sources=specs, experts=[e.source for e in config.experts],
               config_format=config.format, exact=False)
    if config.shared_expert is not None:
        out["shared_expert"] = config.shared_expert.source
    return out

