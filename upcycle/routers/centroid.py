"""MoEfication-style router: row e is the mean input row of expert e's neurons (gate row, or up row
when the FFN is not gated).

A token whose hidden state aligns with an expert's neurons' input weights is sent to it. Rows differ
between the shards of one virtual group, so with ``--method split`` this init is not exact.
Row norm: that of a N(0, router_std^2) row.
"""

import torch

from .base import RouterContext, RouterInit, scale_rows


def build(ctx: RouterContext) -> torch.Tensor:
    inputs = ctx.data.weight(ctx.data.inputs[0])
    rows = [inputs.mean(0) if sl.neurons is None else inputs[sl.neurons].mean(0) for sl in ctx.experts.experts]
    return scale_rows(torch.stack(rows), ctx.std)


ROUTER = RouterInit(name="centroid", build=build, per_expert=True,
                    description="mean gate row of each expert's neurons (MoEfication)")
