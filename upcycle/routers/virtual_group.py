"""One random router row per virtual group, the rows orthogonal (He et al., 2024).

Experts of a group share their row, which keeps the fine-grained split exact; orthogonal rows make
the groups as distinguishable as possible. Row norm: that of a N(0, router_std^2) row.
"""

import torch

from .base import RouterContext, RouterInit, expand_groups, scale_rows


def build(ctx: RouterContext) -> torch.Tensor:
    groups = max(ctx.groups) + 1
    gaussian = torch.randn(ctx.hidden_size, groups, generator=ctx.generator, dtype=torch.float64)
    if groups <= ctx.hidden_size:
        rows = torch.linalg.qr(gaussian).Q.t()
    else:  # more groups than dimensions: orthogonality is impossible
        rows = gaussian.t()
    return expand_groups(scale_rows(rows.float(), ctx.std), ctx.groups)


ROUTER = RouterInit(name="virtual-group", build=build,
                    description="orthogonal random row per virtual group (experts of a group share it)")
