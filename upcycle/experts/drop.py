"""Drop-Upcycling (Nakamura et al., ICLR 2025): replicate, then re-initialise a random part of each expert.

Per expert, a different random ``--drop-ratio`` r of the F neurons get their gate/up rows and down
column redrawn from a normal with the mean and std of the original matrix. Not exact by design: the
experts start diverse, which lets the router learn from the first step.
"""

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext, MethodOptions


@dataclass(frozen=True)
class DropOptions(MethodOptions):
    #: fraction of the FFN's neurons re-initialised in each expert
    drop_ratio: float = 0.5

    def check(self, recipe) -> None:
        if isinstance(self.drop_ratio, bool) or not isinstance(self.drop_ratio, (int, float)) \
                or not 0.0 <= float(self.drop_ratio) <= 1.0:
            raise RecipeError(f"--drop-ratio must be between 0 and 1, got {self.drop_ratio!r}")


def build(ctx: MethodContext) -> LayerExperts:
    count = round(float(ctx.options.drop_ratio) * ctx.dense_size)
    experts = []
    for _ in range(ctx.num_experts):
        dropped = torch.randperm(ctx.dense_size, generator=ctx.generator)[:count].sort().values
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        experts.append(ExpertSlice(reinit=dropped, seed=seed))
    return LayerExperts(experts=experts, groups=list(range(ctx.num_experts)), exact=count == 0)


METHOD = ExpertMethod(name="drop", exact=False, build=build, options=DropOptions,
                      description="Drop-Upcycling: replicate, re-initialise a random --drop-ratio of each expert")
