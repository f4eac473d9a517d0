"""Planning a conversion: every output tensor's name, shape, dtype and recipe, before any data is read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import CorruptCheckpointError, RecipeError
from .experts import MethodContext, get_method
from .experts.noise import add_noise
from .families import DenseFamily, family_for_model_type
from .families.base import SourceView
from .io.safetensors_format import TensorInfo
from .io.writer import output_bytes, split_into_shards
from .layer_data import LayerData
from .layers import select_layers
from .recipe import Recipe, parse_size
from .routers import RouterContext, get_router_init
from .targets import MoeTarget, choose_target
from .tensors import DTYPES, LayerExperts, OutTensor, copied_tensor, generated_tensor, layer_generator

#: buffers that old checkpoints saved and current transformers recomputes (never written to the output)
STALE_BUFFERS = ("rotary_emb.inv_freq",)


@dataclass
class ConversionPlan:
    """The resolved conversion: models, layers, experts and the ordered list of output tensors.

    Targets read ``family``, ``recipe``, ``dense_config``, the sizes, ``dtype``/``dtype_name``, ``layers``
    (layer -> :class:`~upcycle.tensors.LayerExperts`), ``moe_layers``/``dense_layers`` and ``tensors``.
    """

    recipe: Recipe
    family: DenseFamily
    target: MoeTarget
    dense_config: dict[str, Any]
    hidden_size: int
    dense_size: int
    num_layers: int
    moe_layers: list[int]
    layers: dict[int, LayerExperts]
    dtype_name: str
    shared_size: int = 0
    tensors: list[OutTensor] = field(default_factory=list)
    #: canonical dense names that are slices of fused checkpoint tensors (pass to SourceCache)
    source_views: dict[str, SourceView] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.layers]

    @property
    def expert_size(self) -> int:
        widths = {e.width(self.dense_size) for layer in self.layers.values() for e in layer.experts}
        if len(widths) != 1:
            raise RecipeError(f"the target {self.target.name} needs experts of one width, got {sorted(widths)}")
        return widths.pop()

    @property
    def exact(self) -> bool:
        """Whether the MoE computes the dense function: an exact method without noise, a router that keeps
        virtual groups whole, a target that renormalises top-k, and every layer's experts exact."""
        method_exact = get_method(self.recipe.method).exact and not self.recipe.noise_std
        router_exact = not get_router_init(self.recipe.router_init).per_expert or all(
            len(set(l.groups)) == len(l.groups) for l in self.layers.values())
        return (method_exact and router_exact and self.target.renormalises_top_k
                and all(l.exact for l in self.layers.values()))

    @property
    def total_params(self) -> int:
        return sum(t.spec.numel for t in self.tensors)

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the routed experts, plus top-k of them per layer."""
        per_layer: dict[int, int] = {}
        for t in self.tensors:
            if t.expert_of is not None:
                per_layer[t.expert_of] = per_layer.get(t.expert_of, 0) + t.spec.numel
        routed = sum(per_layer.values())
        active_routed = sum(n * self.recipe.top_k // self.recipe.num_experts for n in per_layer.values())
        return self.total_params - routed + active_routed

    def shards(self) -> list:
        """The output tensors' specs cut into safetensors shards of at most ``max_shard_size``."""
        return split_into_shards([t.spec for t in self.tensors], parse_size(self.recipe.max_shard_size))

    def summary(self) -> dict[str, Any]:
        shards = self.shards()
        return {
            "family": self.family.name,
            "target": self.target.name,
            "architecture": self.target.architecture,
            "method": self.recipe.method,
            "exact": self.exact,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.recipe.num_experts,
            "top_k": self.recipe.top_k,
            "dense_ffn_size": self.dense_size,
            "expert_size": self.expert_size,
            "shared_expert_size": self.shared_size,
            "dtype": self.dtype_name,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "output_bytes": output_bytes(shards),
            "shards": len(shards),
        }


def _output_dtype(recipe: Recipe, infos: dict[str, TensorInfo]) -> str:
    if recipe.dtype != "auto":
        return recipe.dtype
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    names = {v: k for k, v in DTYPES.items()}
    return names.get(max(counts, key=counts.get), "float32") if counts else "float32"


def _router_tensor(plan: ConversionPlan, layer: int, data: Optional[LayerData]) -> OutTensor:
    """The router init, given the layer's statistics and its dense matrices read through the cache."""
    experts = plan.layers[layer]
    init = get_router_init(plan.recipe.router_init)
    ctx = RouterContext(layer, plan.hidden_size, experts.groups, layer_generator(plan.recipe.seed, layer, 1),
                        plan.recipe.router_std, experts=experts)
    dtype = plan.dtype

    def make(cache) -> torch.Tensor:
        reader = LayerData.from_cache(plan.family, layer, cache)
        layer_data = reader if data is None else dataclasses.replace(data, weight=reader.weight)
        return init.build(dataclasses.replace(ctx, data=layer_data)).to(dtype)

    name = plan.target.layout.router_name(plan, layer)
    return generated_tensor(name, (len(experts.experts), plan.hidden_size), dtype, make)


def _check_mlp_tensors(plan: ConversionPlan, infos: dict[str, TensorInfo]) -> None:
    for layer in plan.moe_layers:
        for proj in plan.family.mlp:
            key = plan.family.mlp_key(layer, proj)
            if key not in infos:
                raise CorruptCheckpointError(f"the checkpoint has no tensor {key}; is it really a {plan.family.name} model?")
            if not plan.target.supports_mlp_bias and plan.family.mlp_key(layer, proj, "bias") in infos:
                raise RecipeError(f"{plan.family.mlp_key(layer, proj, 'bias')}: MLP biases are not supported by "
                                  f"target {plan.target.name}")


def make_plan(config: Any, infos: dict[str, TensorInfo], recipe: Recipe,
              data: Optional[Callable[[int], LayerData]] = None,
              layer_experts: Optional[Callable[[MethodContext], LayerExperts]] = None) -> ConversionPlan:
    """Resolve family, target, experts and every output tensor.

    Without ``data`` nothing but shapes is read (data-aware partitions take their shapes from the
    contiguous layout); with it, ``data(layer)`` gives the dense matrices and calibration statistics.
    ``layer_experts`` replaces the recipe's expert method (``upcycle merge`` reads experts from other sources).
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    family = family_for_model_type(cfg.get("model_type", ""))
    stored = infos
    infos, views = family.present(cfg, infos)
    num_layers = family.num_layers(cfg)
    target = choose_target(recipe.target, family, cfg, recipe, num_layers)
    method = get_method(recipe.method)
    plan = ConversionPlan(recipe=recipe, family=family, target=target, dense_config=cfg,
                          hidden_size=family.hidden_size(cfg), dense_size=family.intermediate_size(cfg),
                          num_layers=num_layers, moe_layers=select_layers(recipe.layers, num_layers), layers={},
                          dtype_name=_output_dtype(recipe, infos), source_views=views)
    _check_mlp_tensors(plan, infos)
    layer_data: dict[int, Optional[LayerData]] = {}
    for layer in plan.moe_layers:
        layer_data[layer] = data(layer) if data is not None else None
        ctx = MethodContext(layer, plan.dense_size, plan.hidden_size, recipe.num_experts, recipe.top_k,
                            layer_generator(recipe.seed, layer, 0), recipe.method_options, layer_data[layer])
        experts = target.adjust_experts(plan, layer, (layer_experts or method.build)(ctx))
        plan.layers[layer] = add_noise(experts, recipe.noise_std, layer_generator(recipe.seed, layer, 2))
    shared = recipe.option("shared_experts")
    if shared:
        plan.shared_size = plan.dense_size // recipe.option("granularity") * shared
    elif any(l.shared is not None for l in plan.layers.values()):  # a shared expert from layer_experts
        plan.shared_size = max(l.shared.width(plan.dense_size) for l in plan.layers.values() if l.shared is not None)

    out_dtype = plan.dtype
    tied = bool(cfg.get("tie_word_embeddings", False))
    emitted: set[int] = set()
    emitted_fused: set[str] = set()
    for key, info in infos.items():
        if (tied and key == "lm_head.weight") or key.endswith(STALE_BUFFERS):
            continue
        role = family.mlp_role(key)
        if role is not None and role[0] in plan.layers:
            layer = role[0]
            if layer not in emitted:
                emitted.add(layer)
                plan.tensors.append(_router_tensor(plan, layer, layer_data[layer]))
                plan.tensors.extend(target.layer_tensors(plan, layer, infos))
            continue
        if target.keeps_fused and key in views:  # written as stored (e.g. Phi-3 qkv_proj), once
            key = views[key].fused
            if key in emitted_fused:
                continue
            emitted_fused.add(key)
            info = stored[key]
        plan.tensors.append(copied_tensor(key, info.shape, out_dtype if info.dtype.is_floating_point else info.dtype))
    return plan
