"""Fine-grained split with virtual groups (He et al., 2024), exact.

The FFN's F neurons are cut into G shards (``--split-strategy``). With ``--shared-experts S``, S shards
form an always-on shared expert and the other G - S are routed. Each routed shard is copied R times:
expert e holds routed shard ``e mod (G-S)``, belongs to virtual group ``e div (G-S)`` and has its
down projection scaled by G - S. Experts of one group share a router row, so top-k (a multiple of
G - S) picks whole groups and the scale cancels against the renormalised weights.
"""

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..partitions import PartitionContext, get_partition, partition
from ..routers import all_router_inits, get_router_init
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext, MethodOptions, require_integer


@dataclass(frozen=True)
class SplitOptions(MethodOptions):
    #: FFN segments per dense FFN (divides its width)
    granularity: int = 1
    #: how the neurons are cut into segments (a registered partition)
    split_strategy: str = "contiguous"
    #: segments made an always-on shared expert
    shared_experts: int = 0

    @property
    def routed_group_size(self) -> int:
        """Experts per virtual group: the FFN segments that are routed (granularity minus shared)."""
        return self.granularity - self.shared_experts

    def check(self, recipe) -> None:
        require_integer("granularity", self.granularity, 1)
        require_integer("shared-experts", self.shared_experts, 0)
        get_partition(self.split_strategy)
        g, s = self.granularity, self.shared_experts
        if s >= g:
            raise RecipeError(f"--shared-experts {s} must be smaller than --granularity {g}: the FFN is cut into {g} "
                              f"segments, {s} of them shared, and at least one must stay routed")
        group = self.routed_group_size
        what = f"the routed segments per virtual group (granularity {g}" + (f" - {s} shared" if s else "") + \
            f" = {group})"
        if recipe.num_experts % group:
            raise RecipeError(f"--num-experts {recipe.num_experts} must be a multiple of {what}; "
                              f"e.g. {group * max(1, recipe.num_experts // group)}")
        if recipe.top_k % group and not recipe.allow_inexact:
            raise RecipeError(f"--top-k {recipe.top_k} must be a multiple of {what} for the split to be exact "
                              f"(top-k then picks whole virtual groups); use --top-k "
                              f"{group * max(1, recipe.top_k // group)}, or pass --allow-inexact to accept a model "
                              "that deviates from the dense one")
        if get_router_init(recipe.router_init).per_expert and group > 1 and not recipe.allow_inexact:
            shared = [name for name, init in sorted(all_router_inits().items()) if not init.per_expert]
            raise RecipeError(f"--router-init {recipe.router_init} gives each expert its own router row, which breaks "
                              "the exact virtual-group split (experts of a group must share a row); use "
                              f"{', '.join(shared[:-1])} or {shared[-1]}, or pass --allow-inexact")

    def calibration_reasons(self) -> list[str]:
        strategy = get_partition(self.split_strategy)
        return [f"--split-strategy {self.split_strategy}"] if strategy.needs_calibration else []

    def needs_weights(self) -> bool:
        return get_partition(self.split_strategy).needs_data


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def build(ctx: MethodContext) -> LayerExperts:
    g, s = ctx.options.granularity, ctx.options.shared_experts
    if ctx.dense_size % g:
        raise RecipeError(f"--granularity {g} does not divide the FFN width {ctx.dense_size} (intermediate_size); "
                          f"use one of its divisors: {_divisors(ctx.dense_size)}")
    group = g - s
    shards = partition(ctx.options.split_strategy,
                       PartitionContext(ctx.layer, ctx.dense_size, g, ctx.generator, ctx.data))
    shared = ExpertSlice(neurons=torch.cat(shards[:s]).sort().values) if s else None
    routed = shards[s:]
    experts = [ExpertSlice(neurons=routed[e % group], down_scale=float(group)) for e in range(ctx.num_experts)]
    return LayerExperts(experts=experts, groups=[e // group for e in range(ctx.num_experts)], shared=shared,
                        exact=ctx.top_k % group == 0)


METHOD = ExpertMethod(name="split", exact=True, build=build, options=SplitOptions,
                      description="fine-grained experts from FFN shards, replicated in virtual groups (exact)")
