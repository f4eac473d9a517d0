"""Drop-Upcycling (Nakamura et al., ICLR 2025): replicate, then re-initialise a random part of each expert.

Per expert, a different random ``--drop-ratio`` r of the F neurons get their gate/up rows and down
column redrawn from a normal with the mean and std of the original matrix. Not exact by design: the
experts start diverse, which lets the router learn from the first step.
"""

import torch

from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext


def build(ctx: MethodContext) -> LayerExperts:
    count = round(float(ctx.recipe.drop_ratio) * ctx.dense_size)
    experts = []
    for _ in range(ctx.num_experts):
        dropped = torch.randperm(ctx.dense_size, generator=ctx.generator)[:count].sort().values
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        experts.append(ExpertSlice(reinit=dropped, seed=seed))
    return LayerExperts(experts=experts, groups=list(range(ctx.num_experts)), exact=count == 0,
                        notes=[f"{count} of {ctx.dense_size} neurons re-initialised per expert"])


METHOD = ExpertMethod(name="drop", exact=False, build=build,
                      description="Drop-Upcycling: replicate, re-initialise a random --drop-ratio of each expert")
