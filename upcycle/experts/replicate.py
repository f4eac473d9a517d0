"""Sparse upcycling (Komatsuzaki et al., 2023): every expert is a copy of the dense FFN.

Exact whenever the target renormalises the top-k routing weights: the weights sum to one and
every expert computes the same function.
"""

from .base import ExpertMethod, ExpertSlice, LayerExperts, MethodContext


def build(ctx: MethodContext) -> LayerExperts:
    return LayerExperts(experts=[ExpertSlice()] * ctx.num_experts, groups=list(range(ctx.num_experts)))


METHOD = ExpertMethod(name="replicate", exact=True, build=build,
                      description="copy the dense FFN into every expert (exact)")
