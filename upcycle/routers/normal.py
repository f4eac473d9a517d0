"""Gaussian router (std ``--router-std``, default 0.02); one row per virtual group."""

import torch

from .base import RouterContext, RouterInit, expand_groups


def build(ctx: RouterContext) -> torch.Tensor:
    rows = torch.randn(max(ctx.groups) + 1, ctx.hidden_size, generator=ctx.generator, dtype=torch.float32)
    return expand_groups(rows * ctx.std, ctx.groups)


ROUTER = RouterInit(name="normal", build=build, description="N(0, router_std^2) weights")
