"""Fine-grained split with virtual groups (He et al., 2024), exact.

The FFN's F neurons are cut into G shards (``--split-strategy``). With ``--shared-experts S``, S shards
form an always-on shared expert and the other G - S are routed. Each routed shard is copied R times:
expert e holds routed shard ``e mod (G-S)``, belongs to virtual group ``e div (G-S)`` and has its
down projection scaled by G - S. Experts of one group share a router row, so top-k (a multiple of
G - S) picks whole groups and the scale cancels against the renormalised weights.
"""

import torch

from ..errors import RecipeError
from ..partitions import PartitionContext, partition
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def build(ctx: MethodContext) -> LayerExperts:
    recipe = ctx.recipe
    g, s = recipe.granularity, recipe.shared_experts
    if ctx.dense_size % g:
        raise RecipeError(f"--granularity {g} does not divide the FFN width {ctx.dense_size} (intermediate_size); "
                          f"use one of its divisors: {_divisors(ctx.dense_size)}")
    group = g - s
    shards = partition(recipe.split_strategy, PartitionContext(ctx.layer, ctx.dense_size, g, ctx.generator, ctx.data))
    shared = ExpertSlice(neurons=torch.cat(shards[:s]).sort().values) if s else None
    routed = shards[s:]
    experts = [ExpertSlice(neurons=routed[e % group], down_scale=float(group)) for e in range(ctx.num_experts)]
    exact = ctx.top_k % group == 0
    notes = [] if exact else [f"top-k {ctx.top_k} is not a multiple of the group size {group}: not exact"]
    return LayerExperts(experts=experts, groups=[e // group for e in range(ctx.num_experts)], shared=shared,
                        exact=exact, notes=notes)


METHOD = ExpertMethod(name="split", exact=True, build=build,
                      description="fine-grained experts from FFN shards, replicated in virtual groups (exact)")
