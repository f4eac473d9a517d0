"""Planning a conversion: every output tensor's name, shape, dtype and recipe, before any data is read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import CorruptCheckpointError, RecipeError
from .experts import ExpertSlice, LayerExperts, MethodContext, get_method
from .experts.noise import add_noise
from .families import PROJECTIONS, DenseFamily, family_for_model_type
from .families.base import SourceView
from .io.safetensors_format import TensorInfo, TensorSpec
from .layer_data import LayerData
from .layers import select_layers
from .recipe import Recipe
from .routers import RouterContext, get_router_init
from .targets import MoeTarget, choose_target

#: buffers that old checkpoints saved and current transformers recomputes (never written to the output)
STALE_BUFFERS = ("rotary_emb.inv_freq",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SourceCache:
    """Holds the few most recent dense tensors (and their casts), so that every expert copy or slice
    reads its dense matrix once. Outputs built from several dense tensors (packed experts) fit in it.
    ``views`` (from :meth:`DenseFamily.present`) serve canonical names as slices of fused tensors."""

    def __init__(self, read: Callable[[str], torch.Tensor], size: int = 3,
                 views: Optional[dict[str, SourceView]] = None):
        self._read = read
        self._size = size
        self._views = views or {}
        self._entries: dict[str, dict[torch.dtype, torch.Tensor]] = {}
        self._raw_dtype: dict[str, torch.dtype] = {}

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if key in self._views:
            return self._views[key].read(self.get(self._views[key].fused, dtype))
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recent last
        else:
            while len(self._entries) >= self._size:
                oldest = next(iter(self._entries))
                del self._entries[oldest], self._raw_dtype[oldest]
            raw = self._read(key)
            self._entries[key], self._raw_dtype[key] = {raw.dtype: raw}, raw.dtype
        versions = self._entries[key]
        dtype = dtype or self._raw_dtype[key]
        if dtype not in versions:
            versions[dtype] = versions[self._raw_dtype[key]].to(dtype)
        return versions[dtype]


@dataclass
class OutTensor:
    """One output tensor: its spec, the dense tensor it derives from (if any) and how to make it."""

    spec: TensorSpec
    source: Optional[str]  # the main dense tensor it is made from (informational)
    make: Callable[[SourceCache], torch.Tensor]
    expert_of: Optional[int] = None  # layer index when the tensor belongs to a routed expert
    #: dense tensor whose values this repeats unchanged; written from its stored bytes when the dtypes match
    copy_of: Optional[str] = None


@dataclass
class ConversionPlan:
    """The resolved conversion: models, layers, experts and the ordered list of output tensors."""

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

    def summary(self) -> dict[str, Any]:
        from .io.writer import output_bytes, split_into_shards
        from .recipe import parse_size

        shards = split_into_shards([t.spec for t in self.tensors], parse_size(self.recipe.max_shard_size))
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


def zeros_tensor(name: str, shape: tuple[int, ...], plan: ConversionPlan) -> OutTensor:
    """A generated all-zero tensor in the output dtype."""
    dtype = DTYPES.get(plan.dtype_name, torch.float32)
    return OutTensor(TensorSpec(name, tuple(shape), dtype), None, lambda cache: torch.zeros(shape, dtype=dtype))


def _layer_generator(seed: int, layer: int, stream: int) -> torch.Generator:
    """Independent, reproducible random stream per (seed, layer, purpose)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 17 + stream)


def _output_dtype(recipe: Recipe, infos: dict[str, TensorInfo]) -> str:
    if recipe.dtype != "auto":
        return recipe.dtype
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    names = {v: k for k, v in DTYPES.items()}
    return names.get(max(counts, key=counts.get), "float32") if counts else "float32"


def _expert_maker(key: str, proj: str, sl: ExpertSlice, dtype: torch.dtype) -> Callable[[SourceCache], torch.Tensor]:
    key = sl.key(key)

    def make(cache: SourceCache) -> torch.Tensor:
        if sl.is_copy:
            return cache.get(key, dtype)
        dense = cache.get(key, torch.float32)
        dim = 1 if proj == "down" else 0
        tensor = dense if sl.neurons is None else dense.index_select(dim, sl.neurons)
        if sl.reinit is not None or sl.noise_std:
            tensor = _redraw(tensor, dense, dim, sl, PROJECTIONS.index(proj))
        if proj == "down" and sl.down_scale != 1.0:
            tensor = tensor * sl.down_scale
        return tensor.to(dtype).contiguous()

    return make


def _redraw(tensor: torch.Tensor, dense: torch.Tensor, dim: int, sl: ExpertSlice, stream: int) -> torch.Tensor:
    """Drop-Upcycling re-initialisation (from the dense matrix's mean/std) and Gaussian noise."""
    gen = torch.Generator().manual_seed((sl.seed + stream) % 2**63)
    tensor = tensor.clone()
    if sl.reinit is not None and sl.reinit.numel():
        shape = list(tensor.shape)
        shape[dim] = sl.reinit.numel()
        fresh = torch.randn(shape, generator=gen) * dense.std() + dense.mean()
        tensor.index_copy_(dim, sl.reinit, fresh)
    if sl.noise_std:
        tensor += torch.randn(tensor.shape, generator=gen) * sl.noise_std
    return tensor


def slice_tensor(plan: "ConversionPlan", name: str, layer: int, proj: str, sl: ExpertSlice,
                 expert_of: Optional[int] = None) -> OutTensor:
    """An output tensor holding expert slice ``sl`` of the dense ``proj`` matrix of ``layer``; an unchanged
    copy may be written from the source's stored bytes."""
    width = sl.width(plan.dense_size)
    shape = (plan.hidden_size, width) if proj == "down" else (width, plan.hidden_size)
    dtype, key = DTYPES[plan.dtype_name], plan.family.mlp_key(layer, proj)
    return OutTensor(TensorSpec(name, shape, dtype), sl.key(key), _expert_maker(key, proj, sl, dtype),
                     expert_of=expert_of, copy_of=sl.key(key) if sl.is_copy else None)


def _expert_shape(info: TensorInfo, proj: str, width: int) -> tuple[int, ...]:
    rows, cols = info.shape
    return (rows, width) if proj == "down" else (width, cols)


def _router_maker(plan: ConversionPlan, layer: int, data: Optional[LayerData], dtype: torch.dtype):
    """The router init, given the layer's statistics and its dense matrices read through the cache."""
    experts = plan.layers[layer]
    init = get_router_init(plan.recipe.router_init)
    ctx = RouterContext(layer, plan.hidden_size, experts.groups, _layer_generator(plan.recipe.seed, layer, 1),
                        plan.recipe.router_std, experts=experts)

    def make(cache: SourceCache) -> torch.Tensor:
        reader = LayerData.from_cache(plan.family, layer, cache)
        layer_data = reader if data is None else dataclasses.replace(data, weight=reader.weight)
        return init.build(dataclasses.replace(ctx, data=layer_data)).to(dtype)

    return make


def _moe_block(plan: ConversionPlan, layer: int, infos: dict[str, TensorInfo], dtype: torch.dtype,
               data: Optional[LayerData] = None) -> list[OutTensor]:
    """Router, routed experts (projection by projection, so each dense matrix is read once) and extras."""
    target, experts = plan.target, plan.layers[layer]
    out = [OutTensor(TensorSpec(target.router_tensor_name(layer), (len(experts.experts), plan.hidden_size), dtype),
                     None, _router_maker(plan, layer, data, dtype))]
    if target.packed_experts:
        out.extend(_packed_experts(plan, layer, infos, dtype))
    else:
        for proj in PROJECTIONS:
            out.extend(slice_tensor(plan, target.expert_tensor_name(layer, e, proj), layer, proj, sl, expert_of=layer)
                       for e, sl in enumerate(experts.experts))
    if target.extra_layer_tensors is not None:
        out.extend(target.extra_layer_tensors(plan, layer))
    return out


def _packed_experts(plan: ConversionPlan, layer: int, infos: dict[str, TensorInfo], dtype: torch.dtype) -> list[OutTensor]:
    """One tensor per template of ``target.packed_experts``: ``[E, rows, cols]``, each expert's listed
    projections concatenated along rows (e.g. gate then up -> ``[E, 2F, H]``)."""
    out = []
    slices = plan.layers[layer].experts
    for template, projs in plan.target.packed_experts.items():
        keys = [plan.family.mlp_key(layer, proj) for proj in projs]
        shapes = [_expert_shape(infos[key], proj, slices[0].width(plan.dense_size)) for key, proj in zip(keys, projs)]
        shape = (len(slices), sum(s[0] for s in shapes), shapes[0][1])
        makers = [[_expert_maker(key, proj, sl, dtype) for key, proj in zip(keys, projs)] for sl in slices]

        def make(cache: SourceCache, makers=makers) -> torch.Tensor:
            return torch.stack([torch.cat([m(cache) for m in row], dim=0) for row in makers])

        out.append(OutTensor(TensorSpec(template.format(i=layer), shape, dtype), keys[0], make, expert_of=layer))
    return out


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
    ``layer_experts`` replaces the recipe's expert method (``upcycle merge`` builds experts from other sources).
    """
    recipe.validate()
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
                            _layer_generator(recipe.seed, layer, 0), recipe.extra, recipe, layer_data[layer])
        experts = target.adjust_experts(plan, layer, (layer_experts or method.build)(ctx))
        plan.layers[layer] = add_noise(experts, recipe.noise_std, _layer_generator(recipe.seed, layer, 2))
    if recipe.shared_experts:
        plan.shared_size = plan.dense_size // recipe.granularity * recipe.shared_experts
    elif any(l.shared is not None for l in plan.layers.values()):
        plan.shared_size = max(l.shared.width(plan.dense_size) for l in plan.layers.values() if l.shared is not None)

    out_dtype = DTYPES[plan.dtype_name]
    tied = bool(cfg.get("tie_word_embeddings", False))
    emitted: set[int] = set()
    emitted_fused: set[str] = set()
    for key, info in infos.items():
        if (tied and key == "lm_head.weight") or key.endswith(STALE_BUFFERS):
            continue
        role = family.mlp_role(key)
        if role is not None and role[0] in plan.layers:
            if role[0] not in emitted:
                emitted.add(role[0])
                plan.tensors.extend((target.layer_tensors or _moe_block)(plan, role[0], infos, out_dtype, layer_data[role[0]]))
            continue
        if target.keeps_fused and key in views:  # written as stored (e.g. Phi-3 qkv_proj), once
            key = views[key].fused
            if key in emitted_fused:
                continue
            emitted_fused.add(key)
            info = stored[key]
        dtype = out_dtype if info.dtype.is_floating_point else info.dtype
        plan.tensors.append(OutTensor(TensorSpec(key, info.shape, dtype), key,
                                      lambda cache, key=key, dtype=dtype: cache.get(key, dtype), copy_of=key))
    return plan


def build_target_config(plan: ConversionPlan):
    """The target's config: dense keys the target class knows, then the MoE keys."""
    if plan.target.make_config is not None:
        return plan.target.make_config(plan)
    cls = plan.target.config_cls()
    known = cls().to_dict()
    skip = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "dtype",
            "torch_dtype", "id2label", "label2id"}
    kwargs = {k: v for k, v in plan.dense_config.items()
              if (k in known or k in plan.target.copy_keys) and k not in skip}
    kwargs.update(plan.target.config_defaults)
    kwargs.update(plan.target.moe_config(plan))
    config = cls(**kwargs)
    config.architectures = [plan.target.architecture]
    config.dtype = plan.dtype_name
    return config
