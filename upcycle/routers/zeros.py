"""All-zero router: uniform routing weights, ties broken by expert index."""

import torch

from .base import RouterContext, RouterInit


def build(ctx: RouterContext) -> torch.Tensor:
    return torch.zeros(len(ctx.groups), ctx.hidden_size, dtype=torch.float32)


ROUTER = RouterInit(name="zeros", build=build, description="all-zero weights")
